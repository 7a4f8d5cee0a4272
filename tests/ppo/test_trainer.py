"""PPOTrainer end to end on tiny models: step-0 exactness, convergence, resume, accumulation, failures."""

import copy
import json

import pytest
import torch

from alignment.errors import RewardError, TrainingError
from alignment.ppo import PPOConfig, PPOTrainer
from alignment.ppo import trainer as trainer_module
from alignment.ppo.losses import place_score_at_last_token
from policies.value import CausalLMWithValueHead
from tests.float_noise import FLOAT32_LOGPROB_NOISE, is_float32_noise

from .conftest import make_llama, make_seq_critic

PROMPTS = [
    {"prompt": p, "target": t} for p, t in [("a b", "a"), ("c d e", "b"), ("f", "c"), ("g h a b", "d")]
]


def count_target(prompts, completions, target):
    """Reward: how often the row's target word appears in the completion."""
    return [float(c.split().count(t)) for c, t in zip(completions, target)]


def small_config(**overrides):
    values = dict(
        learning_rate=1e-3,
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=5,
        temperature=0.7,
        total_steps=10,
        seed=0,
    )
    values.update(overrides)
    return PPOConfig(**values)


def build(tokenizer, config, critic="separate", reward=count_target, prompts=PROMPTS, dropout=0.0, seed=0):
    lm = make_llama(tokenizer, seed=seed, dropout=dropout)
    ref = copy.deepcopy(lm)
    if critic == "separate":
        policy, value_model = lm, make_seq_critic(tokenizer, seed=seed + 1)
    else:
        policy, value_model = CausalLMWithValueHead(lm), None
    return PPOTrainer(config, policy, ref, value_model, tokenizer, reward, prompts)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------- (a) step 0


@pytest.mark.parametrize("critic", ["separate", "value_head"])
def test_step0_kl_is_zero_and_ratio_is_one_with_dropout_configured(tokenizer, critic):
    trainer = build(tokenizer, small_config(), critic=critic, dropout=0.5)
    lm = trainer.ref_policy
    ids = torch.tensor([[3, 4, 5, 6]])
    lm.train()
    assert not torch.equal(lm(ids).logits, lm(ids).logits)  # dropout is really configured
    lm.eval()
    metrics = trainer.step()
    rollout = trainer.last_rollout
    assert torch.allclose(rollout.logprobs, rollout.ref_logprobs, rtol=0, atol=FLOAT32_LOGPROB_NOISE)
    assert is_float32_noise(metrics["objective/kl"]) and is_float32_noise(metrics["objective/non_score_reward"])
    first = trainer.minibatch_stats[0]
    assert is_float32_noise(first["ratio_max_dev"])  # importance ratio 1 in the first minibatch
    assert is_float32_noise(first["policy/approx_kl"]) and first["policy/clipfrac"] == 0.0  # clip needs |r-1|>=0.2


def test_step0_exact_with_peft_reference_by_disabled_adapter(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    policy = get_peft_model(make_llama(tokenizer, dropout=0.5), lora)
    base_before = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    trainer = PPOTrainer(
        small_config(learning_rate=1e-2),
        policy,
        None,
        make_seq_critic(tokenizer),
        tokenizer,
        count_target,
        PROMPTS,
    )
    trainer.step()
    rollout = trainer.last_rollout
    assert torch.allclose(rollout.logprobs, rollout.ref_logprobs, rtol=0, atol=FLOAT32_LOGPROB_NOISE)
    assert is_float32_noise(trainer.minibatch_stats[0]["ratio_max_dev"])
    trainer.step()
    moved = (trainer.last_rollout.logprobs - trainer.last_rollout.ref_logprobs).abs().max().item()
    assert moved > 100 * FLOAT32_LOGPROB_NOISE  # the adapter moved the policy: far above float noise
    after = policy.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # base weights frozen
    trainer.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    trainer.load(tmp_path / "ckpt")


# --------------------------------------------------- (b) score on the EOS


def test_score_lands_on_the_eos_token_in_a_real_rollout(tokenizer):
    trainer = build(tokenizer, small_config(batch_size=16, max_new_tokens=8))
    trainer.step()
    rollout = trainer.last_rollout
    assert rollout.has_eos.any() and not rollout.has_eos.all()
    placed = place_score_at_last_token(torch.arange(1.0, 17.0), rollout.response_mask)
    eos_rows = rollout.has_eos
    # with an EOS: the score is on the EOS token; without: on the last sampled token (index max_new-1)
    assert torch.equal((placed[eos_rows] != 0), rollout.response_ids[eos_rows] == tokenizer.eos_token_id)
    assert (placed[~eos_rows].argmax(-1) == rollout.response_ids.shape[1] - 1).all()


# ------------------------------------------------------- metrics, rewards


def test_metrics_names_and_reward_columns(tokenizer):
    seen = {}

    def reward(prompts, completions, target):
        seen["target"] = list(target)
        return count_target(prompts, completions, target)

    trainer = build(tokenizer, small_config(), reward=reward)
    history = trainer.train(2, callback=lambda t, m: seen.setdefault("steps", []).append(m["step"]))
    assert seen["steps"] == [1, 2] and len(history) == 2 and trainer.step_count == 2
    assert set(seen["target"]) <= {"a", "b", "c", "d"}
    for name in (
        "objective/kl",
        "objective/entropy",
        "objective/score",
        "objective/non_score_reward",
        "objective/kl_coef",
        "policy/approx_kl",
        "policy/clipfrac",
        "value/clipfrac",
        "value/loss",
        "val/eos_rate",
        "val/response_length",
        "reward/reward",
        "time/generation",
        "time/training",
        "train/lr",
    ):
        assert name in history[-1], name
        assert history[-1][name] == history[-1][name], name  # not NaN


def test_none_scores_are_dropped_and_missing_eos_penalised(tokenizer):
    def half_none(prompts, completions, target):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    metrics = build(tokenizer, small_config(), reward=half_none).step()
    assert metrics["val/dropped_rate"] == 0.5 and metrics["objective/score"] == 1.0

    trainer = build(
        tokenizer,
        small_config(max_new_tokens=1, missing_eos_penalty=-1.0),
        reward=lambda p, c, **k: [0.0] * len(c),
    )
    metrics = trainer.step()
    # a response of 1 token has an EOS only if that token is the EOS; every other one scores -1
    assert metrics["objective/score"] == pytest.approx(-(1.0 - metrics["val/eos_rate"]))
    assert metrics["val/eos_rate"] < 1.0


# ---------------------------------------------------------- (d) convergence


def test_converges_to_the_kl_regularised_optimum_single_token(tokenizer):
    """Single-token responses: pi*(y) = pi_ref(y) exp(r(y)/beta) / Z is the known answer."""
    beta, rewards = 0.5, {"a": 1.0, "b": 0.5}
    config = PPOConfig(
        learning_rate=1e-3,
        critic_learning_rate=1e-2,
        batch_size=64,
        mini_batch_size=16,
        ppo_epochs=4,
        max_new_tokens=1,
        temperature=1.0,
        kl_coef=beta,
        total_steps=40,
        seed=0,
    )
    trainer = build(
        tokenizer,
        config,
        critic="value_head",
        prompts=[{"prompt": "c d"}],
        reward=lambda prompts, completions, **kw: [rewards.get(c, 0.0) for c in completions],
    )
    ids = torch.tensor([tokenizer("c d")["input_ids"]])

    def distribution(model):
        with torch.no_grad():
            return torch.softmax(model(ids).logits[0, -1].float(), -1)

    p_ref = distribution(trainer.ref_policy)
    r = torch.tensor(
        [rewards.get(tokenizer.decode([i], skip_special_tokens=True), 0.0) for i in range(len(tokenizer))]
    )
    p_star = p_ref * torch.exp(r / beta)
    p_star = p_star / p_star.sum()
    policy_lm = trainer.policy.pretrained_model

    def tv():
        return 0.5 * (distribution(policy_lm) - p_star).abs().sum().item()

    initial = tv()
    assert initial > 0.3
    trainer.train()
    final = tv()
    assert final < 0.02 and final < initial / 10, (initial, final)


# --------------------------------------------------------- (e) resume


def test_save_load_resume_gives_the_same_next_step(tokenizer, tmp_path):
    config = small_config(adaptive_kl=True, target_kl=0.01, horizon=100)
    a = build(tokenizer, config)
    a.step()
    a.save(tmp_path / "ckpt")
    expected = a.step()
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "critic" / "model.safetensors").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tmp_path.rglob("*"))
    assert not (tmp_path / "ckpt.tmp").exists()
    assert json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())["global_step"] == 1

    b = build(tokenizer, config)  # same reference model (it is not part of the checkpoint)
    with torch.no_grad():  # scramble the trainable weights: the checkpoint must overwrite them
        for p in [*b.policy.parameters(), *b.critic.parameters()]:
            p.normal_()
    b.load(tmp_path / "ckpt")
    assert b.step_count == 1 and b.kl_ctl.value != config.kl_coef
    resumed = b.step()
    for name, value in expected.items():
        if not name.startswith("time/"):
            assert resumed[name] == pytest.approx(value, abs=1e-6), name
    for (name, x), y in zip(params(a.policy).items(), params(b.policy).values()):
        assert torch.allclose(x, y, atol=1e-6), name


# ------------------------------------------------- (f) gradient accumulation


def test_accumulation_equals_larger_minibatch(tokenizer):
    def run(mini, accum):
        config = small_config(
            batch_size=16, mini_batch_size=mini, gradient_accumulation_steps=accum, ppo_epochs=2
        )
        trainer = build(tokenizer, config)
        before = params(trainer.policy)
        trainer.step()
        return before, params(trainer.policy), params(trainer.critic)

    before, policy_a, critic_a = run(4, 2)
    _, policy_b, critic_b = run(8, 1)
    _, policy_c, _ = run(4, 1)  # twice as many updates: must differ
    moved = max((policy_a[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3
    for k in policy_a:
        assert torch.allclose(policy_a[k], policy_b[k], atol=1e-5), k
    for k in critic_a:
        assert torch.allclose(critic_a[k], critic_b[k], atol=1e-5), k
    assert max((policy_a[k] - policy_c[k]).abs().max().item() for k in policy_a) > 1e-4


# ------------------------------------------------------ failures and health


def test_nonfinite_loss_skips_updates_then_stops(tokenizer, monkeypatch):
    trainer = build(tokenizer, small_config(ppo_epochs=1, max_nonfinite_updates=3))  # 2 updates per step
    before = params(trainer.policy)

    def nan_value_loss(new_values, *args, **kwargs):
        return new_values.sum() * float("nan"), torch.tensor(0.0)

    monkeypatch.setattr(trainer_module, "clipped_value_loss", nan_value_loss)
    metrics = trainer.step()
    assert metrics["train/skipped_updates"] == 2 and trainer.nonfinite_in_a_row == 2
    after = params(trainer.policy)
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped: nothing moved
    monkeypatch.undo()
    trainer.step()  # finite again: updates happen and the count in a row resets
    assert trainer.nonfinite_in_a_row == 0 and trainer.skipped_updates == 2
    assert not all(torch.equal(after[k], v) for k, v in params(trainer.policy).items())
    monkeypatch.setattr(trainer_module, "clipped_value_loss", nan_value_loss)
    trainer.step()
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.step()  # the third skipped update in a row


def test_nan_reward_is_an_error_not_a_zero(tokenizer):
    trainer = build(tokenizer, small_config(), reward=lambda p, c, **k: [float("nan")] * len(c))
    with pytest.raises(RewardError, match="finite"):
        trainer.step()


def test_health_thresholds_warn_or_stop(tokenizer):
    with pytest.warns(RuntimeWarning, match="val/eos_rate"):
        build(tokenizer, small_config(min_eos_rate=1.01)).step()
    with pytest.raises(TrainingError, match="objective/entropy"):
        build(tokenizer, small_config(min_entropy=100.0, warn_or_stop="stop")).step()


def test_bad_inputs_are_refused(tokenizer):
    config = small_config()
    lm = make_llama(tokenizer)
    with pytest.raises(ValueError, match="value head"):
        PPOTrainer(config, lm, copy.deepcopy(lm), None, tokenizer, count_target, PROMPTS)
    with pytest.raises(ValueError, match="peft"):
        PPOTrainer(config, lm, None, make_seq_critic(tokenizer), tokenizer, count_target, PROMPTS)
    with pytest.raises(ValueError, match="itself"):
        PPOTrainer(config, lm, lm, make_seq_critic(tokenizer), tokenizer, count_target, PROMPTS)
    with pytest.raises(ValueError, match="prompt"):
        PPOTrainer(
            config, lm, copy.deepcopy(lm), make_seq_critic(tokenizer), tokenizer, count_target, ["a b"]
        )


# ------------------------------------------ (g) sampling independent of the process count


class _AsRank:
    """The trainer's accelerator, seen as process ``rank`` of ``world`` (for _batch_rows and _rollout)."""

    def __init__(self, accelerator, rank, world):
        self._accelerator, self.process_index, self.num_processes = accelerator, rank, world

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def test_generation_chunks_are_seeded_by_position_so_two_ranks_sample_one_batch(tokenizer):
    one = build(tokenizer, small_config(batch_size=8, mini_batch_size=4, generation_chunk_size=4))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    whole = one._rollout(one._batch_rows(0))
    assert torch.equal(torch.get_rng_state(), state)  # the process's own RNG stream is left as it was
    torch.manual_seed(7)  # another RNG state: the same samples
    assert one._rollout(one._batch_rows(0)).completions == whole.completions
    for rank in (0, 1):
        trainer = build(tokenizer, small_config(batch_size=4, mini_batch_size=4, generation_chunk_size=4))
        trainer.accelerator = _AsRank(trainer.accelerator, rank, 2)
        trainer._holds_first_forward = lambda: False  # this test reads the rollout's own log-prob pass
        part = trainer._rollout(trainer._batch_rows(0))
        rows = slice(4 * rank, 4 * rank + 4)
        assert part.prompts == whole.prompts[rows] and part.completions == whole.completions[rows]
        width = part.response_ids.shape[1]
        assert not whole.response_mask[rows, width:].any()
        for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values"):
            assert torch.allclose(getattr(whole, name)[rows, :width].float(), getattr(part, name).float(),
                                  atol=1e-6), name


def test_a_step_with_no_kept_sample_logs_no_score_not_zero(tokenizer):
    """Issue 17 item 2: every sample dropped (every reward failed) -> objective/score is NaN, not 0.0."""
    import math

    metrics = build(tokenizer, small_config(), reward=lambda p, c, **k: [None] * len(c)).step()
    assert metrics["val/dropped_rate"] == 1.0
    assert math.isnan(metrics["objective/score"]) and math.isnan(metrics["objective/rlhf_reward"]), metrics
