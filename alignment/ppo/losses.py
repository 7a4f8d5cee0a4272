"""The PPO math for language models, as small pure torch functions.

Every function takes batched tensors shaped ``(batch, response_len)`` (or
``(batch, response_len, vocab)`` for logits) together with a ``mask`` of the
same leading shape that is true on real response tokens (the EOS included)
and false on padding. Masked slots may hold anything, NaN and inf included:
they are removed with ``torch.where`` before any arithmetic, because
``NaN * 0`` is NaN and would poison a masked mean.

References
----------
[PPO]   Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy
        Optimization Algorithms", arXiv 1707.06347.
[GAE]   Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional
        Continuous Control Using Generalized Advantage Estimation",
        arXiv 1506.02438.
[KL]    Schulman 2020, "Approximating KL Divergence",
        http://joschu.net/blog/kl-approx.html
[Z19]   Ziegler et al. 2019, "Fine-Tuning Language Models from Human
        Preferences", arXiv 1909.08593, section 2.2.
[N+]    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
        arXiv 2403.17031.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "gae",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "place_score_at_last_token",
]


# ---------------------------------------------------------------- log-probs


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of ``tokens`` under ``softmax(logits / T)``.

    ``log pi_T(y_t | s_t) = z_{y_t} / T - logsumexp_v(z_v / T)``: the same
    temperature ``T`` that sampled the tokens must be used here, in the
    reference model and in the update, or the KL is not zero at step 0
    ([N+] detail "temperature"). Computed in float32.

    ``logits``: (..., V); ``tokens``: (...) -> (...).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / T)`` at every position.

    ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v`` with
    ``z = logits / T``. ``(..., V) -> (...)``.
    """
    z = logits.float() / temperature
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


# ------------------------------------------------------------ masked stats


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """``sum_i m_i x_i``, with masked slots replaced by 0 first (NaN-safe)."""
    mask = mask.bool()
    zeroed = torch.where(mask, values, torch.zeros_like(values))
    return zeroed.sum() if dim is None else zeroed.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """``sum_i m_i x_i / sum_i m_i`` (0 where the mask is empty). NaN-safe."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the valid entries.

    ``var = sum_i m_i (x_i - mean)^2 / n``; with ``unbiased`` (Bessel's
    correction) it is multiplied by ``n / (n - 1)`` when ``n > 1``.
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    centered = torch.where(mask, values - mean, torch.zeros_like(values))
    n = mask.sum()
    var = (centered**2).sum() / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the valid entries to unit variance (and zero mean).

    ``x' = (x - mean) / sqrt(var + eps)`` over valid entries ([N+]: whiten
    advantages over the batch's valid tokens). With ``shift_mean=False`` the
    mean is added back (``x' = (x - mean) / sqrt(var + eps) + mean``), which
    is how rewards are whitened without moving their level. Masked slots
    come out as 0.
    """
    mask = mask.bool()
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


# ------------------------------------------------------------ KL estimators


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = ``log p(x) - log q(x)`` for ``x ~ p``: unbiased for KL(p||q), high variance [KL]."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ``0.5 * (log q(x) - log p(x))^2``: biased, low variance, always >= 0 [KL]."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = ``(r - 1) - log r`` with ``r = q(x)/p(x)``: unbiased and >= 0 [KL]."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) by estimator ``kind`` (k1, k2, k3)."""
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[kind](logp, ref_logp)


# ----------------------------------------------------------------- rewards


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true entry of each row of ``mask`` (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=-1).values


def place_score_at_last_token(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter a per-sequence score onto the last real token of each response.

    The sequence score belongs on the last real response token (the EOS),
    not on the token after it ([N+]; trl issues #3750, #1893). Works for
    right-padded (``1 1 1 0 0``) and left-padded (``0 0 1 1 1``) masks.
    ``scores``: (B,), ``mask``: (B, T) -> (B, T), zero elsewhere (and zero
    for a row with no valid token).
    """
    mask = mask.bool()
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = mask.any(dim=-1)
    idx = last_token_index(mask)
    out[rows, idx[rows]] = scores[rows]
    return out


def per_token_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """KL-shaped per-token rewards [Z19 eq. 2; N+ detail "reward"].

    ``r_t = -beta * (log pi(y_t|s_t) - log pi_ref(y_t|s_t))`` on every valid
    response token, plus the sequence ``score`` on the last valid token.
    Masked slots are 0.
    """
    mask = mask.bool()
    kl = kl_estimate(logp, ref_logp, kl_estimator)
    non_score = torch.where(mask, -beta * kl, torch.zeros_like(kl))
    return non_score + place_score_at_last_token(score.to(non_score.dtype), mask)


# --------------------------------------------------------------------- GAE


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the policy's tokens [GAE eq. 16].

    The steps are the valid (mask-true) positions only, in order: for valid ``t`` with ``n(t)`` the next valid
    position after it (none after the last),

        ``delta_t = r_t + gamma * V_{n(t)} - V_t``   and   ``A_t = delta_t + gamma * lam * A_{n(t)}``,

    with ``V_{n(t)} = A_{n(t)} = 0`` when there is none, so the episode ends at the last valid token.  Masked
    positions are no step and carry nothing: in a single-turn response they are the padding (the mask is one run
    of true), so this is the usual recursion; in a multi-turn episode they are also the environment's tokens
    between two policy turns, which are *bridged*: the last token of turn k bootstraps from the first token of
    turn k+1 and the final score flows back across every tool result (one discount step per policy token, none
    per environment token).  Returns ``(advantages, returns)`` with ``returns = advantages + values``, computed
    before any whitening of the advantages ([N+]).  Masked slots are 0 in both.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(mask, rewards, zeros)
    values = torch.where(mask, values, zeros)
    length = rewards.shape[-1]
    next_value = torch.zeros_like(values[:, 0])  # V and A at the next valid position (0 past the last one)
    next_adv = torch.zeros_like(values[:, 0])
    advantages = [None] * length
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[t] = adv_t
        valid = mask[:, t]
        next_value = torch.where(valid, values[:, t], next_value)  # a masked position passes them through
        next_adv = torch.where(valid, adv_t, next_adv)
    adv = torch.where(mask, torch.stack(advantages, dim=1), zeros)
    return adv, torch.where(mask, adv + values, zeros)


# ------------------------------------------------------------------ losses


def _normalised_sum(values: torch.Tensor, mask: torch.Tensor, num_tokens) -> torch.Tensor:
    """Masked mean, or masked sum / ``num_tokens`` when a count is given."""
    if num_tokens is None:
        return masked_mean(values, mask)
    return masked_sum(values, mask) / max(float(num_tokens), 1.0)


def clipped_policy_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, as a loss to minimise [PPO eq. 7].

    ``rho_t = exp(new_logp - old_logp)``;
    ``L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))``
    over valid tokens. Returns ``(loss, clipfrac, approx_kl)`` where
    ``clipfrac`` is the fraction of valid tokens where the clipped branch is
    active and ``approx_kl`` is the k3 estimate ``mean((rho - 1) - log rho)``
    of KL(old || new) ([KL]); the last two are detached.

    ``num_tokens``: divide the masked sum by this count instead of the
    mask's own, so that micro-batches accumulated into one update give the
    same gradient as one large minibatch.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(new_logp)
    log_ratio = torch.where(mask, new_logp - old_logp, zeros)
    advantages = torch.where(mask, advantages, zeros)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = _normalised_sum(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss [N+ detail "value clipping"; PPO baselines].

    ``V_clip = V_old + clip(V_new - V_old, -eps, eps)``;
    ``L = 0.5 * mean_t max((V_new - R_t)^2, (V_clip - R_t)^2)`` over valid
    tokens. Returns ``(loss, clipfrac)``, ``clipfrac`` (detached) being the
    fraction of valid tokens where the clipped term is the larger one.
    ``num_tokens`` as in :func:`clipped_policy_loss`.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(new_values)
    new_values = torch.where(mask, new_values, zeros)
    old_values = torch.where(mask, old_values, zeros)
    returns = torch.where(mask, returns, zeros)
    v_clipped = old_values + torch.clamp(new_values - old_values, -clip, clip)
    unclipped = (new_values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * _normalised_sum(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


# ----------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: beta stays fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient [Z19 section 2.2].

    ``e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)``;
    ``beta_{t+1} = beta_t * (1 + K_beta * e_t)`` with ``K_beta = n_steps / horizon``
    (``n_steps`` = samples in the batch that produced ``KL_t``).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
