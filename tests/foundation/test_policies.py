import pytest
import torch

import policies
from alignment.errors import CheckpointError
from policies.tiny import CHAT_TEMPLATE, PRESETS


def test_tokenizer_round_trip_and_digits_are_single_tokens(tiny_tokenizer):
    text = "What is 17 + 25? 42."
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    tokens = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer("1234")["input_ids"])
    assert tokens == ["1", "2", "3", "4"]


def test_special_tokens_pad_differs_from_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token == "<|pad|>"
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_chat_template_pinned(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}]
    assert tiny_tokenizer.chat_template == CHAT_TEMPLATE
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 1 + 2?<|im_end|><|im_start|>assistant\n3<|im_end|>"
    )
    prompt = tiny_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 1 + 2?<|im_end|><|im_start|>assistant\n"


def test_retraining_the_tokenizer_gives_the_shipped_one(tiny_tokenizer, repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", repo_root / "data/tiny_arith/make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    import random

    from policies.tiny import train_tokenizer

    files = make_data.build(random.Random(make_data.SEED))
    fresh = train_tokenizer(make_data.tokenizer_corpus(files))
    assert fresh.get_vocab() == tiny_tokenizer.get_vocab()


@pytest.mark.parametrize("preset, low, high", [("1m", 0.8e6, 1.5e6), ("20m", 15e6, 25e6), ("qwen-1m", 0.8e6, 1.5e6)])
def test_presets_sizes_and_seeded_init(preset, low, high):
    model, tokenizer = policies.load(f"tiny:{preset}", seed=3)
    count = sum(p.numel() for p in model.parameters())
    assert low < count < high, count
    assert model.dtype == torch.float32  # fp32 on CPU
    again, _ = policies.load(f"tiny:{preset}", seed=3)
    other, _ = policies.load(f"tiny:{preset}", seed=4)
    first = next(iter(model.state_dict().values()))
    assert torch.equal(first, next(iter(again.state_dict().values())))
    assert not torch.equal(first, next(iter(other.state_dict().values())))
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_unknown_preset_lists_valid():
    with pytest.raises(KeyError, match="valid presets"):
        policies.load("tiny:7b")
    assert set(PRESETS) >= {"1m", "20m"}


def test_pickle_checkpoint_refused(tmp_path):
    model, tokenizer = policies.load("tiny:1m")
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # what older tools wrote
    with pytest.raises(CheckpointError, match="pickle"):
        policies.load(str(tmp_path))


def test_default_dtype_is_fp32_on_cpu():
    assert policies.default_dtype("cpu") == torch.float32


def test_end_token_ids_one_definition_for_every_caller():
    """EOS + the generation config's EOS + end-of-turn tokens in the vocabulary, never the pad token."""
    from types import SimpleNamespace

    from policies.tokens import end_token_ids

    vocab = {"<|im_end|>": 7, "<|endoftext|>": 3, "<|eot_id|>": 9, "a": 1, "<unk>": 0}
    tokens = {i: t for t, i in vocab.items()}
    tokenizer = SimpleNamespace(eos_token_id=7, pad_token_id=3,
                                convert_tokens_to_ids=lambda t: vocab.get(t, 0),  # unknown -> the unk id
                                convert_ids_to_tokens=lambda i: tokens[i])
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 11]))
    assert end_token_ids(tokenizer, model) == {7, 9, 11}  # 3 pads batches (Qwen2.5's <|endoftext|>)
    assert end_token_ids(tokenizer) == {7, 9}


def test_every_response_ending_reads_the_same_ids():
    """Generation, PPO rollouts and the SFT audit agree on the tiny tokenizer (one home: policies.tokens)."""
    import policies
    from alignment.evaluation.generate import _eos_ids
    from alignment.ppo.rollout import stop_token_ids
    from policies.tokens import end_token_ids

    model, tokenizer = policies.load("tiny:1m", seed=0)
    expected = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert end_token_ids(tokenizer, model) == expected == _eos_ids(model, tokenizer) \
        == set(stop_token_ids(tokenizer, model))
