"""The trainer with each estimator, loss and KL placement: groups, no critic, and the known optima."""

import copy
import math

import pytest
import torch

from alignment.ppo import PPOConfig, PPOTrainer
from policies.value import CausalLMWithValueHead

from .conftest import make_llama, make_seq_critic

BETA, BANDIT_REWARDS = 0.5, {"a": 1.0, "b": 0.5}
PROMPTS = [{"prompt": p, "target": t} for p, t in [("a b", "a"), ("c d e", "b"), ("f", "c"), ("g h a b", "d")]]


def count_target(prompts, completions, target):
    return [float(c.split().count(t)) for c, t in zip(completions, target)]


def bandit_reward(prompts, completions, **kwargs):
    return [BANDIT_REWARDS.get(c, 0.0) for c in completions]


def make_trainer(tokenizer, config, reward=count_target, prompts=PROMPTS):
    lm = make_llama(tokenizer, seed=0)
    ref = copy.deepcopy(lm)
    policy = CausalLMWithValueHead(lm) if config.needs_critic else lm
    return PPOTrainer(config, policy, ref, None, tokenizer, reward, prompts)


def small(**overrides):
    values = dict(learning_rate=1e-3, batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=5,
                  temperature=0.7, total_steps=10, seed=0, advantage_estimator="grpo", num_generations=4)
    values.update(overrides)
    return PPOConfig(**values)


# ------------------------------------------------------------ groups and critics


def test_each_prompt_fills_num_generations_consecutive_rows(tokenizer):
    trainer = make_trainer(tokenizer, small(batch_size=8, num_generations=4))
    rows = trainer._batch_rows(0)
    assert len(rows) == 8 and rows[0:4] == [rows[0]] * 4 and rows[4:8] == [rows[4]] * 4 and rows[0] != rows[4]
    # the prompts a group run visits are the ones one sample per prompt visits, in the same order
    single = make_trainer(tokenizer, small(batch_size=2, mini_batch_size=2, num_generations=1, advantage_estimator="gae"))
    assert [rows[0], rows[4]] == single._batch_rows(0)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_estimators_train_the_policy_and_no_critic(tokenizer, tmp_path, estimator):
    groups = 1 if estimator == "reinforce_pp" else 4
    trainer = make_trainer(tokenizer, small(advantage_estimator=estimator, num_generations=groups))
    assert trainer.critic is None and len(trainer.optimizer.param_groups) == 1
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    metrics = [trainer.step() for _ in range(2)][-1]
    moved = max((trainer.policy.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-4
    assert not any(k.startswith("value/") for k in metrics)
    assert all(math.isfinite(v) for k, v in metrics.items() if isinstance(v, float) and k != "objective/score")
    trainer.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "critic").exists() and (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_a_critic_with_a_critic_free_estimator_is_refused(tokenizer):
    lm = make_llama(tokenizer)
    with pytest.raises(ValueError, match="uses no critic"):
        PPOTrainer(small(), lm, copy.deepcopy(lm), make_seq_critic(tokenizer), tokenizer, count_target, PROMPTS)
    with pytest.raises(ValueError, match="uses no critic"):
        PPOTrainer(small(), CausalLMWithValueHead(lm), copy.deepcopy(lm), None, tokenizer, count_target, PROMPTS)
    with pytest.raises(ValueError, match="value head"):  # gae still needs one
        PPOTrainer(small(advantage_estimator="gae", num_generations=1), lm, copy.deepcopy(lm), None, tokenizer,
                   count_target, PROMPTS)


def test_kl_in_the_loss_leaves_the_reward_alone(tokenizer):
    in_loss = make_trainer(tokenizer, small(kl_in="loss", kl_estimator="k3", kl_coef=0.1))
    in_loss.step()
    metrics = in_loss.step()  # after one update the policy differs from the reference
    assert metrics["objective/non_score_reward"] == 0.0 and metrics["objective/kl"] != 0.0
    assert metrics["policy/kl_loss"] > 0.0  # k3 >= 0
    in_reward = make_trainer(tokenizer, small(kl_coef=0.1))
    in_reward.step()
    metrics = in_reward.step()
    assert "policy/kl_loss" not in metrics and metrics["objective/non_score_reward"] != 0.0


# ------------------------------------------------- one-step bandit: the known optima


def bandit(tokenizer, steps=40, **overrides):
    """One prompt, one-token responses, reward r(y); returns (TV to pi*, TV to the reverse-KL optimum)."""
    values = dict(learning_rate=1e-3, critic_learning_rate=1e-2, batch_size=64, mini_batch_size=16, ppo_epochs=4,
                  max_new_tokens=1, temperature=1.0, kl_coef=BETA, total_steps=steps, seed=0)
    values.update(overrides)
    trainer = make_trainer(tokenizer, PPOConfig(**values), reward=bandit_reward, prompts=[{"prompt": "c d"}])
    ids = torch.tensor([tokenizer("c d")["input_ids"]])
    lm = trainer.policy.pretrained_model if trainer.config.needs_critic else trainer.policy

    def distribution(model):
        with torch.no_grad():
            return torch.softmax(model(ids).logits[0, -1].double(), -1)

    p_ref = distribution(trainer.ref_policy)
    r = torch.tensor([BANDIT_REWARDS.get(tokenizer.decode([i], skip_special_tokens=True), 0.0)
                      for i in range(len(tokenizer))], dtype=torch.float64)
    trainer.train()
    p = distribution(lm)
    return 0.5 * (p - optimum(p_ref, r)).abs().sum().item(), 0.5 * (p - reverse_kl_optimum(p_ref, r)).abs().sum().item()


def optimum(p_ref, r):
    """argmax_pi E_pi[r] - beta KL(pi || pi_ref) = pi_ref exp(r / beta) / Z."""
    p = p_ref * torch.exp(r / BETA)
    return p / p.sum()


def reverse_kl_optimum(p_ref, r):
    """argmax_pi E_pi[r] - beta KL(pi_ref || pi): stationarity r(y) + beta p_ref(y) / pi(y) = lambda, so
    pi(y) = beta p_ref(y) / (lambda - r(y)) with lambda > max r chosen by bisection so that it sums to 1."""
    low, high = r.max().item() + 1e-12, r.max().item() + BETA + 1.0
    for _ in range(200):
        mid = (low + high) / 2
        total = (BETA * p_ref / (mid - r)).sum().item()
        low, high = (mid, high) if total > 1 else (low, mid)
    p = BETA * p_ref / (high - r)
    return p / p.sum()


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo"])
def test_kl_in_the_reward_reaches_the_analytic_optimum(tokenizer, estimator):
    tv, _ = bandit(tokenizer, advantage_estimator=estimator, num_generations=1 if estimator == "gae" else 8)
    assert tv <= 0.05, tv


def test_k2_as_a_loss_term_has_the_same_optimum_as_k1_in_the_reward(tokenizer):
    # grad E[k2] = E_pi[(log pi - log pi_ref) grad log pi] = grad KL(pi || pi_ref): the same objective
    tv, _ = bandit(tokenizer, advantage_estimator="rloo", num_generations=8, kl_in="loss", kl_estimator="k2")
    assert tv <= 0.05, tv


def test_k3_as_a_loss_term_optimises_the_reverse_kl(tokenizer):
    # grad E[k3] = E_pi[(1 - pi_ref / pi) grad log pi] = -E_pi_ref[grad log pi] = grad KL(pi_ref || pi)
    tv_forward, tv_reverse = bandit(tokenizer, advantage_estimator="rloo", num_generations=8, kl_in="loss",
                                    kl_estimator="k3")
    assert tv_reverse <= 0.05 < tv_forward, (tv_reverse, tv_forward)


def test_one_on_policy_update_reuses_its_forward_for_the_old_logprobs(tokenizer, monkeypatch):
    """One update per step, no critic, KL in the loss: the rollout's policy pass is skipped (the update's forward
    gives the same log-probs) and the step ends with the same weights and metrics as with the pass."""
    from alignment.ppo import rollout as rollout_module

    config = small(batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=1, kl_in="loss",
                   kl_estimator="k3", kl_coef=0.1)
    passes = []
    original = rollout_module._policy_pass
    monkeypatch.setattr(rollout_module, "_policy_pass", lambda *a, **k: passes.append(1) or original(*a, **k))

    def run(reuse):
        trainer = make_trainer(tokenizer, config)
        assert trainer._reuses_update_pass()
        if not reuse:
            monkeypatch.setattr(trainer, "_reuses_update_pass", lambda: False)
        metrics = [trainer.step() for _ in range(2)][-1]
        return metrics, {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}

    with_pass, weights_a = run(reuse=False)
    assert passes
    passes.clear()
    reused, weights_b = run(reuse=True)
    assert not passes  # no policy log-prob pass in the rollout
    for name, value in weights_a.items():
        assert torch.allclose(weights_b[name], value, atol=1e-6), name
    for key in ("objective/kl", "objective/entropy", "policy/loss", "policy/kl_loss", "objective/score"):
        assert reused[key] == pytest.approx(with_pass[key], abs=1e-5), key
    assert reused["policy/ratio_mean"] == 1.0 and with_pass["objective/kl"] != 0.0
    assert not make_trainer(tokenizer, small(ppo_epochs=2, kl_in="loss"))._reuses_update_pass()
    assert not make_trainer(tokenizer, small(ppo_epochs=1, mini_batch_size=8))._reuses_update_pass()  # KL in reward
