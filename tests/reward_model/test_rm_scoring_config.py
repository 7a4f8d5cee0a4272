"""reward_config.json beside a reward model: RewardModel's default bias and text format."""

import json

import pytest

torch = pytest.importorskip("torch")

from alignment.errors import RewardError  # noqa: E402
from reward.model import REWARD_CONFIG, RewardModel, read_reward_config  # noqa: E402

PROMPTS = [[{"role": "user", "content": "What is 1 + 2?"}], [{"role": "user", "content": "What is 10 + 20?"}]]
COMPLETIONS = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "31"}]]


@pytest.fixture(scope="module")
def seq_cls_dir(tmp_path_factory):
    """A random one-output sequence classifier with the tiny tokenizer (it has a chat template)."""
    from transformers import LlamaForSequenceClassification

    from policies.tiny import load_tiny_tokenizer, tiny_config

    tokenizer = load_tiny_tokenizer()
    config = tiny_config("1m", tokenizer)
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # well-separated scores
    path = tmp_path_factory.mktemp("seq_cls")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def with_config(base, tmp_path, config):
    import shutil

    target = tmp_path / "rm"
    shutil.copytree(base, target)
    if config is not None:
        (target / REWARD_CONFIG).write_text(config if isinstance(config, str) else json.dumps(config))
    return str(target)


def test_bias_from_reward_config_is_the_default_and_an_explicit_bias_wins(seq_cls_dir, tmp_path):
    raw = RewardModel(str(seq_cls_dir), device="cpu")(PROMPTS, COMPLETIONS)
    assert read_reward_config(str(seq_cls_dir)) == {}
    path = with_config(seq_cls_dir, tmp_path, {"bias": 0.75, "use_chat_template": True, "centered_on": "x"})
    centred = RewardModel(path, device="cpu")
    assert centred.bias == 0.75
    assert centred(PROMPTS, COMPLETIONS) == pytest.approx([s - 0.75 for s in raw], abs=1e-5)
    assert RewardModel(path, bias=0.0, device="cpu")(PROMPTS, COMPLETIONS) == pytest.approx(raw, abs=1e-5)


def test_use_chat_template_false_means_plain_text_as_trained(seq_cls_dir, tmp_path):
    path = with_config(seq_cls_dir, tmp_path, {"bias": 0.0, "use_chat_template": False})
    rm = RewardModel(path, device="cpu")
    assert not rm.use_chat_template
    # what trl's RewardTrainer trains on for standard data: prompt + chosen + eos
    assert rm.text("What is 1 + 2?", " 3") == "What is 1 + 2? 3<|im_end|>"
    assert RewardModel(path, use_chat_template=True, device="cpu").use_chat_template


@pytest.mark.parametrize("config, message", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "JSON object"),
    ({"bias": "high"}, "wrong type"),
    ({"bias": True}, "wrong type"),
    ('{"bias": NaN}', "finite"),
    ({"use_chat_template": 1}, "wrong type"),
])
def test_malformed_reward_config_is_an_error_naming_the_file(seq_cls_dir, tmp_path, config, message):
    path = with_config(seq_cls_dir, tmp_path, config)
    with pytest.raises(RewardError, match=message) as info:
        RewardModel(path, device="cpu")
    assert REWARD_CONFIG in str(info.value)
