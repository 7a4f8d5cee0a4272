"""Registries of advantage estimators and policy losses for our RL loop, as small pure torch functions.

A recipe names one of each (``train.advantage_estimator``, ``train.policy_loss``); the trainer looks
them up here. A registry is a dict and a decorator, and a lookup of an unknown name lists the valid ones.

Estimators share one keyword signature::

    estimator(rewards, mask, *, values=None, scores=None, group_size=1, gamma=1.0, lam=0.95) -> (advantages, returns)

``rewards`` (B, T) are the per-token rewards (the sequence score on the last valid token, plus
``-beta * KL_t`` on every token when the KL is in the reward), ``mask`` (B, T) the valid response
tokens (a dropped sample has an all-false row), ``values`` (B, T) the critic's values (estimators that
need a critic only), ``scores`` (B,) the sequence scores alone (without the KL part), ``group_size``
the number of consecutive rows sampled from the same prompt.
``returns`` are the value targets (None when the estimator trains no critic). Masked slots are 0.

A sequence-level estimator works on ``R_i = sum_t rewards_{i,t}`` (the score plus the summed KL part)
and gives every token of response ``i`` the same advantage.

Policy losses share one signature::

    loss(new_logp, old_logp, advantages, mask, *, clip, dual_clip) -> (per_token_loss, clipped)

``per_token_loss`` (B, T) is what the trainer aggregates over the update (:func:`aggregate`), and
``clipped`` (B, T, bool) marks the tokens where a clipped branch is active (the clip fraction).

References
----------
[GAE]    Schulman et al. 2016, arXiv 1506.02438.
[GRPO]   Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, section 4.1.
[DrGRPO] Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783, section 3.
[RLOO]   Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", arXiv 2402.14740.
[R++]    Hu 2025, "REINFORCE++", arXiv 2501.03262.
[PPO]    Schulman et al. 2017, arXiv 1707.06347, eq. 7.
[DUAL]   Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", arXiv 1912.09729, eq. 5.
[GSPO]   Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071, eq. 5-7.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignment.ppo.losses import gae as gae_recursion
from alignment.ppo.losses import masked_sum

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "EstimatorSpec",
    "aggregate",
    "discounted_returns",
    "estimator_spec",
    "group_mean_std",
    "policy_loss_fn",
    "register_advantage_estimator",
    "register_policy_loss",
    "sequence_rewards",
]

GROUP_STD_EPS = 1e-4  # GRPO's (r - mean) / (std + eps): trl and verl use 1e-4 / 1e-6; a group that all tie gets 0


@dataclass(frozen=True)
class EstimatorSpec:
    """An advantage estimator and what the trainer must do around it."""

    name: str
    fn: Callable
    needs_critic: bool = False  # a value head or separate critic is built, and the value loss trained
    grouped: bool = False  # needs num_generations >= 2 samples of each prompt
    whiten: bool = False  # the trainer whitens the advantages over the whole batch (every process)
    aggregation: str = "token_mean"  # how the per-token loss is reduced unless train.loss_aggregation says otherwise


ADVANTAGE_ESTIMATORS: dict[str, EstimatorSpec] = {}
POLICY_LOSSES: dict[str, Callable] = {}
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def register_advantage_estimator(name: str, **spec):
    """``@register_advantage_estimator("name", needs_critic=..., grouped=..., whiten=..., aggregation=...)``."""

    def decorate(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = EstimatorSpec(name, fn, **spec)
        return fn

    return decorate


def register_policy_loss(name: str):
    """``@register_policy_loss("name")``."""

    def decorate(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        return fn

    return decorate


def estimator_spec(name: str) -> EstimatorSpec:
    """The registered estimator ``name``; an unknown name is a KeyError listing the valid ones."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise KeyError(f"unknown advantage_estimator {name!r}; valid: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    return ADVANTAGE_ESTIMATORS[name]


def policy_loss_fn(name: str) -> Callable:
    """The registered policy loss ``name``; an unknown name is a KeyError listing the valid ones."""
    if name not in POLICY_LOSSES:
        raise KeyError(f"unknown policy_loss {name!r}; valid: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


# ------------------------------------------------------------------ shared pieces


def sequence_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``R_i = sum_t m_{i,t} r_{i,t}``: the sequence score plus its summed KL part. (B, T) -> (B,)."""
    return masked_sum(rewards, mask, dim=-1)


def group_mean_std(values: torch.Tensor, valid: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased std of the row's group (``group_size`` consecutive rows), over valid rows.

    ``mean_g = sum_{j in g} v_j / n_g`` and ``std_g = sqrt(sum_{j in g} (v_j - mean_g)^2 / (n_g - 1))``
    over the group's valid rows ``j`` (std 0 when ``n_g < 2``). (B,) -> ((B,), (B,)).
    """
    if values.shape[0] % group_size:
        raise ValueError(f"{values.shape[0]} rows do not split into groups of {group_size}")
    v = torch.where(valid, values, torch.zeros_like(values)).view(-1, group_size)
    m = valid.view(-1, group_size).to(values.dtype)
    n = m.sum(dim=1, keepdim=True)
    mean = v.sum(dim=1, keepdim=True) / n.clamp(min=1)
    squares = (m * (v - mean) ** 2).sum(dim=1, keepdim=True)
    std = torch.where(n > 1, torch.sqrt(squares / (n - 1).clamp(min=1)), torch.zeros_like(squares))
    return mean.expand(-1, group_size).reshape(-1), std.expand(-1, group_size).reshape(-1)


def _on_tokens(per_sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per response onto its valid tokens (0 elsewhere)."""
    mask = mask.bool()
    return torch.where(mask, per_sequence.unsqueeze(-1).expand(mask.shape), torch.zeros(mask.shape, dtype=per_sequence.dtype, device=mask.device))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{s >= t} gamma^(s - t) m_s r_s`` over each response's valid tokens (0 at padding)."""
    mask = mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    running = torch.zeros_like(rewards[:, 0])
    out = [None] * rewards.shape[1]
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[t] = running
    return torch.where(mask, torch.stack(out, dim=1), torch.zeros_like(rewards))


# ------------------------------------------------------------------ estimators


@register_advantage_estimator("gae", needs_critic=True, whiten=True)
def gae(rewards, mask, *, values=None, scores=None, group_size=1, gamma=1.0, lam=0.95):
    """GAE with a learned critic [GAE eq. 16], the trainer then whitens the advantages over the batch.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``; returns ``A + V``
    (value targets, taken before whitening).
    """
    if values is None:
        raise ValueError("advantage_estimator 'gae' needs the critic's values")
    return gae_recursion(rewards, values, mask, gamma, lam)


@register_advantage_estimator("grpo", grouped=True, aggregation="sequence_mean")
def grpo(rewards, mask, *, values=None, scores=None, group_size=1, gamma=1.0, lam=0.95):
    """GRPO outcome advantage [GRPO eq. 3]: ``A_i = (R_i - mean_g R) / (std_g R + eps)`` on every token.

    ``std`` is the unbiased group std; the loss is a per-sequence token mean, then a mean over sequences.
    """
    valid = mask.bool().any(dim=-1)
    r = sequence_rewards(rewards, mask)
    mean, std = group_mean_std(r, valid, group_size)
    return _on_tokens((r - mean) / (std + GROUP_STD_EPS), mask), None


@register_advantage_estimator("dr_grpo", grouped=True, aggregation="constant")
def dr_grpo(rewards, mask, *, values=None, scores=None, group_size=1, gamma=1.0, lam=0.95):
    """Dr. GRPO [DrGRPO sec. 3.1]: ``A_i = R_i - mean_g R`` (no std division) on every token.

    Its loss is summed over tokens and divided by a constant (sequences x max_new_tokens), not by each
    response's length: both divisions bias the gradient (longer wrong answers, easy or hard prompts).
    """
    valid = mask.bool().any(dim=-1)
    r = sequence_rewards(rewards, mask)
    mean, _ = group_mean_std(r, valid, group_size)
    return _on_tokens(r - mean, mask), None


@register_advantage_estimator("rloo", grouped=True)
def rloo(rewards, mask, *, values=None, scores=None, group_size=1, gamma=1.0, lam=0.95):
    """REINFORCE leave-one-out [RLOO eq. 8]: ``A_i = R_i - 1/(k-1) sum_{j != i} R_j`` on every token.

    Equivalently ``A_i = k/(k-1) (R_i - mean_g R)``, ``k`` the group's valid samples (0 when ``k < 2``).
    """
    valid = mask.bool().any(dim=-1)
    r = sequence_rewards(rewards, mask)
    mean, _ = group_mean_std(r, valid, group_size)
    k = valid.view(-1, group_size).sum(dim=1, keepdim=True).expand(-1, group_size).reshape(-1).to(r.dtype)
    scale = torch.where(k > 1, k / (k - 1).clamp(min=1), torch.zeros_like(k))
    return _on_tokens(scale * (r - mean), mask), None


@register_advantage_estimator("reinforce_pp", whiten=True)
def reinforce_pp(rewards, mask, *, values=None, scores=None, group_size=1, gamma=1.0, lam=0.95):
    """REINFORCE++ [R++ eq. 5-7]: token returns ``G_t = sum_{s >= t} gamma^(s-t) r_s`` (the KL in ``r_t``).

    No critic and no group: the trainer normalises the returns over the whole batch (every process),
    ``A = (G - mean_batch G) / std_batch G``.
    """
    return discounted_returns(rewards, mask, gamma), None


@register_advantage_estimator("reinforce_pp_baseline", grouped=True, whiten=True)
def reinforce_pp_baseline(rewards, mask, *, values=None, scores=None, group_size=1, gamma=1.0, lam=0.95):
    """REINFORCE++ with a group baseline [R++ sec. 3.3]: the group's mean score is taken off first.

    ``r'_{i,T_i} = r_{i,T_i} - mean_g(s)`` on the last token, ``s_j`` being sample ``j``'s sequence score
    (``scores``, without the KL part), then the returns of :func:`reinforce_pp`, normalised over the batch
    by the trainer. The KL part of the rewards is left as it is (it is per token, not a group statistic).
    """
    if scores is None:
        raise ValueError("advantage_estimator 'reinforce_pp_baseline' needs the sequence scores")
    mask = mask.bool()
    valid = mask.any(dim=-1)
    last = _last_token_onehot(mask)
    mean, _ = group_mean_std(scores.to(rewards.dtype), valid, group_size)
    shifted = rewards - torch.where(last, mean.unsqueeze(-1).expand(mask.shape), torch.zeros_like(rewards))
    return discounted_returns(shifted, mask, gamma), None


def _last_token_onehot(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values
    return mask & (positions == last.unsqueeze(-1))


# ------------------------------------------------------------------ policy losses


@register_policy_loss("ppo_clip")
def ppo_clip(new_logp, old_logp, advantages, mask, *, clip=0.2, dual_clip=3.0):
    """PPO's clipped surrogate per token [PPO eq. 7]: ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``.

    ``rho = exp(new_logp - old_logp)``; ``dual_clip`` is unused.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(new_logp)
    ratio = torch.exp(torch.where(mask, new_logp - old_logp, zeros))
    advantages = torch.where(mask, advantages, zeros)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@register_policy_loss("dual_clip")
def dual_clip_loss(new_logp, old_logp, advantages, mask, *, clip=0.2, dual_clip=3.0):
    """Dual-clip PPO [DUAL eq. 5]: for ``A < 0`` the loss is also capped at ``-c A``, so ``rho`` above ``c``
    (a token the old policy found unlikely) cannot push an unbounded negative update.

    ``L_t = max(-A rho, -A clip(rho))`` for ``A >= 0``; ``min(max(-A rho, -A clip(rho)), -c A)`` for ``A < 0``.
    """
    loss, clipped = ppo_clip(new_logp, old_logp, advantages, mask, clip=clip)
    advantages = torch.where(mask.bool(), advantages, torch.zeros_like(advantages))
    cap = -dual_clip * advantages
    capped = (advantages < 0) & (loss > cap)
    return torch.where(capped, cap, loss), clipped | capped


@register_policy_loss("gspo")
def gspo(new_logp, old_logp, advantages, mask, *, clip=0.2, dual_clip=3.0):
    """GSPO [GSPO eq. 5-7]: one importance ratio per sequence, the geometric mean of its token ratios,
    ``s_i = exp(mean_t (new_logp - old_logp))``, clipped per sequence:
    ``L_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps))``, placed on each of the sequence's tokens
    (with ``A_i`` the advantage its tokens share; the paper's clip range is ~3e-4 to 4e-4).
    """
    mask = mask.bool()
    zeros = torch.zeros_like(new_logp)
    count = mask.sum(dim=-1).clamp(min=1)
    log_s = torch.where(mask, new_logp - old_logp, zeros).sum(dim=-1) / count
    ratio = torch.exp(log_s).unsqueeze(-1).expand(mask.shape)
    seq_adv = torch.where(mask, advantages, zeros).sum(dim=-1, keepdim=True) / count.unsqueeze(-1)
    unclipped = -seq_adv * ratio
    clipped = -seq_adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.where(mask, torch.maximum(unclipped, clipped), zeros)
    return loss, mask & (clipped > unclipped)


# ------------------------------------------------------------------ aggregation


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, divisor: float, max_tokens: int = 1):
    """Reduce a per-token loss over one update's share; ``divisor`` counts the whole update (all micro-batches).

    * ``token_mean``: ``sum_{i,t} m l / N_tokens`` (``divisor`` = valid tokens of the update);
    * ``sequence_mean``: ``sum_i (sum_t m l / |y_i|) / N_seq`` (``divisor`` = valid sequences);
    * ``constant``: ``sum_{i,t} m l / (N_seq * max_tokens)`` (``divisor`` = valid sequences) [DrGRPO].
    """
    mask = mask.bool()
    if how == "token_mean":
        return masked_sum(per_token, mask) / max(float(divisor), 1.0)
    if how == "sequence_mean":
        lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)
        return masked_sum(per_token / lengths, mask) / max(float(divisor), 1.0)
    if how == "constant":
        return masked_sum(per_token, mask) / (max(float(divisor), 1.0) * max_tokens)
    raise KeyError(f"unknown loss_aggregation {how!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
