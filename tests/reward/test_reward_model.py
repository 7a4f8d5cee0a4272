"""A learned reward model directory as a source: last-real-token scoring, padding invariance."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from alignment.errors import RewardError  # noqa: E402
from reward import RewardSource, resolve  # noqa: E402
from reward.model import RewardModel, last_token_index  # noqa: E402

WORDS = (
    "what is one two three four five six seven eight nine plus the answer user assistant hello yes no".split()
)
CHAT_TEMPLATE = "{% for m in messages %}<bos> {{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"


def make_tokenizer(pad_is_eos=False, chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<eos>" if pad_is_eos else "<pad>",
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_model_dir(path, pad_is_eos=False, chat_template=None, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = make_tokenizer(pad_is_eos, chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a random head of std 0.02 gives tiny scores: make them well separated
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("rm_plain"))


@pytest.fixture(scope="module")
def rm_chat_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("rm_chat"), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def rm_pad_eos_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("rm_pad_eos"), pad_is_eos=True)


PROMPTS = ["what is one plus two", "what is four plus five plus six", "hello"]
COMPLETIONS = ["three", "the answer is nine plus six", "yes yes no"]


def alone(rm, prompts=PROMPTS, completions=COMPLETIONS):
    return [rm([p], [c])[0] for p, c in zip(prompts, completions)]


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_scores_equal_scoring_alone(rm_dir, side):
    rm = RewardModel(rm_dir, padding_side=side, device="cpu")
    assert not rm.model.training
    single = alone(rm)
    batched = rm(PROMPTS, COMPLETIONS)
    assert (
        len(set(len(rm._encode(rm.text(p, c))) for p, c in zip(PROMPTS, COMPLETIONS))) == 3
    )  # padding happens
    assert batched == pytest.approx(single, abs=1e-5)
    assert max(single) - min(single) > 1e-3  # distinct samples, distinct scores


def test_left_and_right_padding_agree_and_batch_size_does_not_matter(rm_dir):
    left = RewardModel(rm_dir, padding_side="left", device="cpu")(PROMPTS, COMPLETIONS)
    right = RewardModel(rm_dir, padding_side="right", batch_size=2, device="cpu")(PROMPTS, COMPLETIONS)
    assert left == pytest.approx(right, abs=1e-5)


def test_score_is_read_at_the_last_real_token_even_when_pad_is_eos(rm_pad_eos_dir):
    rm = RewardModel(rm_pad_eos_dir, padding_side="right", device="cpu")
    assert rm.tokenizer.pad_token_id == rm.tokenizer.eos_token_id
    text = rm.text(PROMPTS[0], COMPLETIONS[0])
    assert text == "what is one plus two" + "three" + "<eos>"  # plain path: prompt + completion + eos
    ids = torch.tensor([rm._encode(text)])
    assert ids[0, -1].item() == rm.tokenizer.eos_token_id
    with torch.no_grad():  # reference: the score head applied at the final position (the eos)
        hidden = rm.model.model(input_ids=ids).last_hidden_state
        expected = rm.model.score(hidden)[0, -1, 0].item()
        pad_lookup = rm.model(input_ids=ids).logits[0, 0].item()
    got = rm([PROMPTS[0]], [COMPLETIONS[0]])[0]
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(pad_lookup - expected) > 1e-4  # transformers' pad lookup skips the eos: the bug we avoid
    batched = rm(PROMPTS, COMPLETIONS)
    assert batched == pytest.approx(alone(rm), abs=1e-5)


def test_chat_template_is_used_when_present(rm_chat_dir):
    rm = RewardModel(rm_chat_dir, padding_side="left", device="cpu")
    assert rm.use_chat_template
    assert rm.text("hello", "yes") == "<bos> user hello <eos> <bos> assistant yes <eos> "
    assert rm(PROMPTS, COMPLETIONS) == pytest.approx(alone(rm), abs=1e-5)
    plain = RewardModel(rm_chat_dir, use_chat_template=False, device="cpu")
    assert plain.text("hello", "yes") == "helloyes<eos>"


def test_conversational_prompt_keeps_the_whole_conversation(rm_chat_dir):
    rm = RewardModel(rm_chat_dir, device="cpu")
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "what is one plus one"},
    ]
    completion = [{"role": "assistant", "content": "two"}]
    src = RewardSource(rm, name="rm")
    got = src([conversation], [completion])[0]
    full = rm.tokenizer.apply_chat_template(conversation + completion, tokenize=False)
    assert got == pytest.approx(rm.score_texts([full])[0], abs=1e-6)


def test_bias_is_subtracted_and_resolve_builds_from_a_directory(rm_dir):
    base = RewardModel(rm_dir, device="cpu")(PROMPTS, COMPLETIONS)
    rm = resolve(rm_dir, bias=0.5, device="cpu")
    assert isinstance(rm, RewardModel)
    assert rm(PROMPTS, COMPLETIONS) == pytest.approx([s - 0.5 for s in base], abs=1e-6)


def test_truncation_keeps_the_end_and_is_counted(rm_dir):
    rm = RewardModel(rm_dir, max_length=3, device="cpu")
    scores = rm(PROMPTS, COMPLETIONS)
    assert rm.truncated == 3 and len(scores) == 3


def test_not_a_sequence_classification_directory(tmp_path, rm_dir):
    cfg = json.load(open(os.path.join(rm_dir, "config.json")))
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RewardError, match="not a sequence-classification model"):
        RewardModel(str(tmp_path))
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    cfg["id2label"] = {"0": "a", "1": "b"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RewardError, match="single-score head"):
        RewardModel(str(tmp_path))


def test_source_wrapper_and_build_with_a_model_directory(rm_dir):
    from reward import build

    combined = build([{"source": rm_dir, "name": "rm", "kwargs": {"device": "cpu"}}, "answer_match"])
    result = combined(PROMPTS, COMPLETIONS, answer=[3, 15, None])
    assert result.per_source["rm"] == pytest.approx(
        RewardModel(rm_dir, device="cpu")(PROMPTS, COMPLETIONS), abs=1e-5
    )
    assert result.per_source["answer_match"] == [0.0, 0.0, None]
