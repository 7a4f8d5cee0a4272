"""The estimator and policy-loss registries against numbers worked out by hand (each in a comment)."""

import math

import pytest
import torch

from alignment.ppo import PPOConfig
from alignment.ppo.advantages import (
    ADVANTAGE_ESTIMATORS,
    GROUP_STD_EPS,
    POLICY_LOSSES,
    aggregate,
    discounted_returns,
    estimator_spec,
    group_mean_std,
    policy_loss_fn,
    register_advantage_estimator,
)
from alignment.ppo.losses import clipped_policy_loss
from alignment.ppo.losses import gae as gae_recursion

NAN = float("nan")


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# Three responses of one prompt (a group of 3), token rewards with the score on the last valid token:
#   row 0: [1, 2]      R_0 = 3
#   row 1: [0, pad]    R_1 = 0
#   row 2: [0, 0]      R_2 = 0
REWARDS = torch.tensor([[1.0, 2.0], [0.0, NAN], [0.0, 0.0]])
MASK = torch.tensor([[1, 1], [1, 0], [1, 1]]).bool()


def test_group_mean_and_unbiased_std_over_valid_rows():
    # group [3, 0, 0]: mean 1; squares (2^2 + 1 + 1) = 6, / (3 - 1) = 3 -> std sqrt 3
    mean, std = group_mean_std(torch.tensor([3.0, 0.0, 0.0]), torch.tensor([True, True, True]), 3)
    assert close(mean, [1, 1, 1]) and close(std, [math.sqrt(3)] * 3)
    # the second row dropped: group [3, 0] -> mean 1.5, std sqrt(((1.5)^2 * 2) / 1) = 2.1213
    mean, std = group_mean_std(torch.tensor([3.0, 7.0, 0.0]), torch.tensor([True, False, True]), 3)
    assert close(mean, [1.5] * 3) and close(std, [math.sqrt(4.5)] * 3)
    # two groups of two are separate: [1, 3] -> 2, sqrt 2; [5, 5] -> 5, 0
    mean, std = group_mean_std(torch.tensor([1.0, 3.0, 5.0, 5.0]), torch.ones(4, dtype=torch.bool), 2)
    assert close(mean, [2, 2, 5, 5]) and close(std, [math.sqrt(2)] * 2 + [0, 0])


def test_grpo_is_group_standardised_on_every_token():
    adv, returns = estimator_spec("grpo").fn(REWARDS, MASK, group_size=3)
    # (R - mean) / (std + eps) = [2, -1, -1] / (sqrt 3 + 1e-4)
    s = math.sqrt(3) + GROUP_STD_EPS
    assert close(adv, [[2 / s, 2 / s], [-1 / s, 0.0], [-1 / s, -1 / s]]) and returns is None


def test_grpo_gives_zero_to_a_group_that_ties():
    adv, _ = estimator_spec("grpo").fn(torch.ones(2, 1), torch.ones(2, 1).bool(), group_size=2)
    assert close(adv, [[0.0], [0.0]])  # std 0: (1 - 1) / (0 + eps) = 0, not NaN


def test_dr_grpo_drops_the_std():
    adv, _ = estimator_spec("dr_grpo").fn(REWARDS, MASK, group_size=3)
    assert close(adv, [[2.0, 2.0], [-1.0, 0.0], [-1.0, -1.0]])  # R - mean = [2, -1, -1]


def test_rloo_is_leave_one_out():
    adv, _ = estimator_spec("rloo").fn(REWARDS, MASK, group_size=3)
    # A_0 = 3 - (0 + 0)/2 = 3; A_1 = 0 - (3 + 0)/2 = -1.5; A_2 = -1.5
    assert close(adv, [[3.0, 3.0], [-1.5, 0.0], [-1.5, -1.5]])


def test_rloo_with_a_dropped_sample_and_a_lone_sample():
    # group 1 = rows 0-2 with row 1 dropped: [3, 0] -> A = 3 - 0 = 3, 0 - 3 = -3; group 2 = rows 3-5 with
    # one valid sample: no baseline exists, advantage 0
    rewards = torch.tensor([[3.0], [9.0], [0.0], [5.0], [0.0], [0.0]])
    mask = torch.tensor([[1], [0], [1], [1], [0], [0]]).bool()
    adv, _ = estimator_spec("rloo").fn(rewards, mask, group_size=3)
    assert close(adv, [[3.0], [0.0], [-3.0], [0.0], [0.0], [0.0]])


def test_reinforce_pp_returns_are_discounted_sums():
    rewards, mask = torch.tensor([[0.1, -0.2, 1.0]]), torch.ones(1, 3).bool()
    # gamma 1: G = [0.1 - 0.2 + 1, -0.2 + 1, 1] = [0.9, 0.8, 1.0]
    adv, returns = estimator_spec("reinforce_pp").fn(rewards, mask)
    assert close(adv, [[0.9, 0.8, 1.0]]) and returns is None
    # gamma 0.5: G_2 = 1, G_1 = -0.2 + 0.5 = 0.3, G_0 = 0.1 + 0.15 = 0.25
    assert close(discounted_returns(rewards, mask, 0.5), [[0.25, 0.3, 1.0]])
    assert estimator_spec("reinforce_pp").whiten  # batch-normalised by the trainer


def test_reinforce_pp_baseline_subtracts_the_group_mean_score_on_the_last_token():
    # KL parts -0.1 on every token, scores [1, 0] (group of 2, mean 0.5) on the last tokens:
    # row 0 rewards [-0.1, -0.1 + 1] -> [-0.1, 0.4] after the baseline -> returns [0.3, 0.4]
    # row 1 rewards [-0.1 + 0] (one token)   -> [-0.6]                  -> returns [-0.6]
    rewards = torch.tensor([[-0.1, 0.9], [-0.1, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]]).bool()
    adv, _ = estimator_spec("reinforce_pp_baseline").fn(rewards, mask, scores=torch.tensor([1.0, 0.0]), group_size=2)
    assert close(adv, [[0.3, 0.4], [-0.6, 0.0]])


def test_gae_entry_is_the_recursion_and_needs_values():
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2).bool()
    adv, returns = estimator_spec("gae").fn(rewards, mask, values=values, gamma=1.0, lam=0.95)
    expected_adv, expected_ret = gae_recursion(rewards, values, mask, 1.0, 0.95)
    assert torch.equal(adv, expected_adv) and torch.equal(returns, expected_ret)
    # delta_1 = 1 - 0.2 = 0.8; delta_0 = 0 + 0.2 - 0.5 = -0.3; A_0 = -0.3 + 0.95 * 0.8 = 0.46
    assert close(adv, [[0.46, 0.8]])
    with pytest.raises(ValueError, match="critic"):
        estimator_spec("gae").fn(rewards, mask)


def test_which_estimators_need_a_critic_or_groups():
    assert {n for n, s in ADVANTAGE_ESTIMATORS.items() if s.needs_critic} == {"gae"}
    assert {n for n, s in ADVANTAGE_ESTIMATORS.items() if s.grouped} == {
        "grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}


# ---------------------------------------------------------------- policy losses


def test_ppo_clip_is_the_existing_clipped_surrogate():
    new = torch.tensor([[0.0, math.log(2.0), math.log(0.5), 9.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    per_token, clipped = policy_loss_fn("ppo_clip")(new, old, adv, mask, clip=0.2)
    # rho = [1, 2, 0.5]: max(-1, -1) = -1; max(-2, -1.2) = -1.2 (clipped); A=-1: max(0.5, 0.8) = 0.8 (clipped)
    assert close(per_token[:, :3], [[-1.0, -1.2, 0.8]])
    assert clipped[0, :3].tolist() == [False, True, True]
    reference, _, _ = clipped_policy_loss(new, old, adv, mask, 0.2, num_tokens=3)
    assert close(aggregate(per_token, mask, "token_mean", 3), reference)  # (-1 - 1.2 + 0.8) / 3


def test_dual_clip_caps_negative_advantages():
    # A = -1 at rho = 5: PPO gives max(5, 1.2) = 5, the dual clip caps it at c |A| = 3;
    # A = -1 at rho = 2: max(2, 1.2) = 2 < 3, unchanged; A = +1 at rho = 5: max(-5, -1.2) = -1.2, unchanged
    new = torch.log(torch.tensor([[5.0, 2.0, 5.0]]))
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3).bool()
    per_token, clipped = policy_loss_fn("dual_clip")(new, torch.zeros(1, 3), adv, mask, clip=0.2, dual_clip=3.0)
    assert close(per_token, [[3.0, 2.0, -1.2]])
    assert clipped.tolist() == [[True, False, True]]


def test_gspo_uses_one_geometric_mean_ratio_per_sequence():
    # token log-ratios [ln 2, 0] -> s = exp(ln 2 / 2) = sqrt 2 on both tokens
    new = torch.tensor([[math.log(2.0), 0.0], [math.log(2.0), 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.ones(2, 2).bool()
    per_token, clipped = policy_loss_fn("gspo")(new, torch.zeros(2, 2), adv, mask, clip=0.2)
    s = math.sqrt(2.0)
    # A = +1: max(-s, -1.2) = -1.2 (clipped, no gradient); A = -1: max(s, 1.2) = s (unclipped)
    assert close(per_token, [[-1.2, -1.2], [s, s]])
    assert clipped.tolist() == [[True, True], [False, False]]
    # sequence mean of row 1's loss = s = exp(mean_t logratio_t): d s / d logp_t = s / 2 = 0.7071 per token
    aggregate(per_token, mask, "sequence_mean", 2).backward()
    assert close(new.grad, [[0.0, 0.0], [s / 4, s / 4]])  # / 2 sequences in the mean


def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, NAN], [3.0, NAN, NAN]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    assert close(aggregate(per_token, mask, "token_mean", 3), 2.0)  # (1 + 2 + 3) / 3 tokens
    assert close(aggregate(per_token, mask, "sequence_mean", 2), 2.25)  # (3/2 + 3/1) / 2 sequences
    assert close(aggregate(per_token, mask, "constant", 2, max_tokens=3), 1.0)  # 6 / (2 x 3)
    with pytest.raises(KeyError, match="token_mean"):
        aggregate(per_token, mask, "mean", 2)


# ---------------------------------------------------------------- registries


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(KeyError, match="dr_grpo, gae, grpo, reinforce_pp, reinforce_pp_baseline, rloo"):
        estimator_spec("ppo")
    with pytest.raises(KeyError, match="dual_clip, gspo, ppo_clip"):
        policy_loss_fn("clip")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("gae")(lambda *a, **k: None)
    assert set(POLICY_LOSSES) == {"ppo_clip", "dual_clip", "gspo"}


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"advantage_estimator": "grpo"}, "num_generations"),  # a group estimator with one sample a prompt
        ({"advantage_estimator": "gpro", "num_generations": 4}, "advantage_estimator"),
        ({"policy_loss": "clip"}, "policy_loss"),
        ({"kl_in": "both"}, "kl_in"),
        ({"loss_aggregation": "mean"}, "loss_aggregation"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"num_generations": 3}, "batch_size"),  # 64 samples do not split into groups of 3
        ({"num_generations": 0}, "num_generations"),
        ({"pack_updates": "yes"}, "pack_updates"),
        ({"share_prompt": "auto"}, "share_prompt"),
        ({"share_prefill": 1}, "share_prefill"),
    ],
)
def test_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key) as info:
        PPOConfig(**kwargs)
    assert info.value.key == key


def test_config_defaults_are_todays_ppo():
    cfg = PPOConfig()
    assert (cfg.advantage_estimator, cfg.policy_loss, cfg.kl_in, cfg.num_generations) == ("gae", "ppo_clip", "reward", 1)
    assert cfg.needs_critic and cfg.aggregation == "token_mean"
    grpo = PPOConfig(advantage_estimator="grpo", num_generations=8)
    assert not grpo.needs_critic and grpo.aggregation == "sequence_mean"
    assert PPOConfig(advantage_estimator="dr_grpo", num_generations=8).aggregation == "constant"
    assert PPOConfig(advantage_estimator="grpo", num_generations=8, loss_aggregation="token_mean").aggregation == "token_mean"
