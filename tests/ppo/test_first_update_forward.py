"""With one micro-batch per epoch, the rollout's policy and critic pass is the first update's forward.

The trainer then skips that pass in the rollout, runs the first update's forward (with its graph) before the
advantages, fills the rollout's log-probs, entropy and values from it, and backpropagates the same graph. These
tests run each set-up twice from the same seed, with the held forward and with the rollout's own pass, and
require the same rollout numbers, metrics and weights (up to float rounding).
"""

import copy

import pytest
import torch

from alignment.ppo import PPOConfig, PPOTrainer
from alignment.ppo import rollout as rollout_module
from policies.value import CausalLMWithValueHead

from .conftest import make_llama, make_seq_critic

PROMPTS = [{"prompt": p, "target": t} for p, t in [("a b", "a"), ("c d e", "b"), ("f", "c"), ("g h a b", "d")]]


def count_target(prompts, completions, target):
    return [float(c.split().count(t)) for c, t in zip(completions, target)]


def config(**overrides):
    values = dict(learning_rate=1e-3, batch_size=8, mini_batch_size=8, ppo_epochs=3, max_new_tokens=5,
                  temperature=0.7, total_steps=10, seed=0)
    values.update(overrides)
    return PPOConfig(**values)


def build(tokenizer, cfg, critic):
    lm = make_llama(tokenizer, seed=0)
    ref = copy.deepcopy(lm)
    if not cfg.needs_critic:
        return PPOTrainer(cfg, lm, ref, None, tokenizer, count_target, PROMPTS)
    if critic == "separate":
        return PPOTrainer(cfg, lm, ref, make_seq_critic(tokenizer, seed=1), tokenizer, count_target, PROMPTS)
    return PPOTrainer(cfg, CausalLMWithValueHead(lm), ref, None, tokenizer, count_target, PROMPTS)


def run(tokenizer, cfg, critic, hold, monkeypatch, steps=2):
    trainer = build(tokenizer, cfg, critic)
    assert trainer._holds_first_forward()
    if not hold:
        monkeypatch.setattr(trainer, "_holds_first_forward", lambda: False)
    passes, forwards = [], []
    forward = trainer._forward
    monkeypatch.setattr(trainer, "_forward", lambda batch: forwards.append(1) or forward(batch))
    original = rollout_module._policy_pass
    monkeypatch.setattr(rollout_module, "_policy_pass", lambda *a, **k: passes.append(1) or original(*a, **k))
    history, rollouts = [], []
    for _ in range(steps):
        history.append(trainer.step())
        rollouts.append({k: v.clone() for k, v in trainer.last_rollout.tensors().items()})
    monkeypatch.setattr(rollout_module, "_policy_pass", original)
    models = [trainer.policy] + ([trainer.critic] if trainer.critic is not None else [])
    weights = {f"{i}.{k}": v.detach().clone() for i, m in enumerate(models) for k, v in m.state_dict().items()}
    assert len(forwards) == steps * cfg.ppo_epochs  # one update forward per epoch: the held one is not rerun
    return history, rollouts, weights, len(passes)


@pytest.mark.parametrize("critic,overrides", [
    ("separate", {}),
    ("value_head", {}),
    ("value_head", {"kl_estimator": "k3", "whiten_rewards": True}),
    (None, {"advantage_estimator": "rloo", "num_generations": 4}),  # no critic, KL in the reward
])
def test_held_first_forward_equals_the_rollout_pass(tokenizer, monkeypatch, critic, overrides):
    cfg = config(**overrides)
    base_history, base_rollouts, base_weights, base_passes = run(tokenizer, cfg, critic, False, monkeypatch)
    history, rollouts, weights, passes = run(tokenizer, cfg, critic, True, monkeypatch)
    assert base_passes == 2 and passes == 0  # the rollout's policy pass ran only without the held forward
    for base, held in zip(base_rollouts, rollouts):
        assert torch.equal(base["response_ids"], held["response_ids"])  # the same samples
        for key in ("logprobs", "ref_logprobs", "values", "entropy"):
            assert torch.allclose(base[key], held[key], atol=1e-5), (key, (base[key] - held[key]).abs().max())
    if cfg.needs_critic:
        assert base_rollouts[-1]["values"].abs().max() > 0  # the values were filled, not left at 0
    for base, held in zip(base_history, history):
        for key in ("objective/kl", "objective/entropy", "objective/score", "policy/loss", "policy/approx_kl",
                    "value/loss", "value/mean"):
            if key in base:
                assert held[key] == pytest.approx(base[key], abs=1e-5), key
    moved = max((base_weights[k] - build_weights).abs().max().item()
                for k, build_weights in _initial_weights(tokenizer, cfg, critic).items())
    assert moved > 1e-4  # the updates changed the weights, so equal weights below mean equal updates
    for name, value in base_weights.items():
        assert torch.allclose(weights[name], value, atol=1e-6), name


def _initial_weights(tokenizer, cfg, critic):
    trainer = build(tokenizer, cfg, critic)
    models = [trainer.policy] + ([trainer.critic] if trainer.critic is not None else [])
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(models) for k, v in m.state_dict().items()}


def test_held_only_with_one_micro_batch_per_epoch(tokenizer):
    assert build(tokenizer, config(), "separate")._holds_first_forward()
    assert not build(tokenizer, config(mini_batch_size=4), "separate")._holds_first_forward()
    assert not build(tokenizer, config(mini_batch_size=4, gradient_accumulation_steps=2), "value_head")._holds_first_forward()


@pytest.mark.parametrize("critic,held", [("separate", False), ("value_head", True)])
def test_under_mixed_precision_a_separate_critic_is_not_held(tokenizer, critic, held):
    # two networks' held graphs cost more peak memory than trl's PPO under bf16 (the docstring's numbers)
    from accelerate.state import AcceleratorState, GradientState

    from alignment.ppo.trainer import make_accelerator

    cfg = config()
    lm = make_llama(tokenizer, seed=0)
    separate = make_seq_critic(tokenizer, seed=1) if critic == "separate" else None
    policy = lm if critic == "separate" else CausalLMWithValueHead(lm)
    try:
        trainer = PPOTrainer(cfg, policy, copy.deepcopy(lm), separate, tokenizer, count_target, PROMPTS,
                             accelerator=make_accelerator(cfg, "bf16"))
        assert trainer._holds_first_forward() is held
    finally:
        AcceleratorState._reset_state(True)  # the next test's accelerator starts from fp32
        GradientState._reset_state()
