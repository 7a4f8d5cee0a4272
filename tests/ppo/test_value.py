"""The critic: value-head initialisation, per-token values, and safetensors save/load."""

import math

import pytest
import torch

from alignment.errors import CheckpointError
from policies.value import (
    VALUE_HEAD_FILE,
    CausalLMWithValueHead,
    SequenceCritic,
    ValueHead,
    build_critic,
    per_token_values,
)

from .conftest import make_llama


def test_value_head_init_std_and_zero_bias():
    torch.manual_seed(0)
    head = ValueHead(1023)  # std 1/sqrt(1024) = 1/32
    assert head.summary.bias.item() == 0.0
    assert abs(head.summary.weight.std().item() - 1 / 32) < 0.1 / 32


def test_value_head_wrapper_shapes_and_logits_to_keep(tokenizer):
    lm = make_llama(tokenizer).eval()
    model = CausalLMWithValueHead(lm).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    full = model(ids, torch.ones_like(ids))
    assert full.logits.shape == (1, 5, len(tokenizer)) and full.values.shape == (1, 5)
    assert full.values.dtype == torch.float32
    kept = model(ids, torch.ones_like(ids), logits_to_keep=3)
    # the kept positions are exactly the last three of the full pass
    assert torch.allclose(kept.logits, full.logits[:, -3:]) and torch.allclose(
        kept.values, full.values[:, -3:]
    )
    assert torch.allclose(full.logits, lm(ids).logits)  # the head does not change the LM's output
    assert torch.allclose(
        per_token_values(model, ids, torch.ones_like(ids), values_to_keep=2), full.values[:, -2:], atol=1e-6
    )


def test_value_head_save_and_load(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = CausalLMWithValueHead(make_llama(tokenizer, seed=0))
    model.save_pretrained(tmp_path)
    assert (tmp_path / VALUE_HEAD_FILE).is_file() and (tmp_path / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path)  # the directory is a plain transformers model
    loaded = CausalLMWithValueHead.from_pretrained(tmp_path)
    assert torch.equal(loaded.v_head.summary.weight, model.v_head.summary.weight)
    other = CausalLMWithValueHead(make_llama(tokenizer, seed=5))
    other.load_weights(tmp_path)  # in place, as a resumed run does
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    (tmp_path / VALUE_HEAD_FILE).unlink()
    with pytest.raises(CheckpointError, match="value head"):
        other.load_value_head(tmp_path)


def test_separate_critic_from_causal_lm_copies_backbone(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    lm = make_llama(tokenizer).eval()
    critic = SequenceCritic.from_model(lm).eval()
    ids = torch.tensor([[0, 0, 3, 4, 5], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    hidden_lm = lm.model(ids, attention_mask=mask).last_hidden_state
    hidden_critic = critic.model.model(ids, attention_mask=mask).last_hidden_state
    # the same weights in another module (other addresses; MKL may round by alignment): float32 rounding apart
    assert torch.allclose(hidden_lm, hidden_critic, rtol=0, atol=1e-5)
    head = critic.model.score
    assert head.weight.shape == (1, 32)
    assert abs(head.weight.std().item() - 1 / math.sqrt(33)) < 0.5 / math.sqrt(33)
    values = per_token_values(critic, ids, mask)
    assert values.shape == (2, 5) and torch.isfinite(values).all()
    critic.save_pretrained(tmp_path)
    reloaded = SequenceCritic(AutoModelForSequenceClassification.from_pretrained(tmp_path)).eval()
    assert torch.allclose(per_token_values(reloaded, ids, mask), values, atol=1e-6)


def test_build_critic_kinds(tokenizer):
    lm = make_llama(tokenizer)
    policy, critic = build_critic("value_head", lm)
    assert isinstance(policy, CausalLMWithValueHead) and critic is None
    policy, critic = build_critic("separate", lm)
    assert policy is lm and isinstance(critic, SequenceCritic)
    with pytest.raises(ValueError, match="value_head"):
        build_critic("shared", lm)
