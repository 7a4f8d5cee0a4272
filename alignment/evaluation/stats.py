"""Small pure statistics for evaluation reports.

Each function states its formula in its docstring and is tested against
numbers worked by hand in ``tests/evaluation/test_stats.py``. Inputs are plain
Python sequences or numpy arrays (torch tensors also work: they are converted
with ``numpy.asarray``). Nothing here touches a model.

Conventions:

* ``None`` means "this sample has no score" (the reward contract's "does not
  apply"); functions that document it drop such entries and count them.
* A NaN or an infinity is never averaged silently: it raises ``DataError``.
* Empty inputs raise ``DataError`` where the statistic is undefined, except
  where a documented neutral value exists (``distinct_n`` of no n-grams is 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from alignment.errors import DataError

__all__ = [
    "accuracy",
    "bootstrap_ci",
    "distinct_n",
    "first_integer",
    "kl_monte_carlo",
    "mean_std",
    "perplexity_from_nll",
    "win_rate",
    "win_rate_with_ci",
]


def _finite_array(values: Any, what: str) -> np.ndarray:
    """``values`` as a float64 array; DataError if any entry is NaN or infinite."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}: expected numbers, got {type(values).__name__} ({exc})") from None
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
        raise DataError(f"{what}: non-finite value {arr.ravel()[bad]!r} at flat index {bad}")
    return arr


# --------------------------------------------------------------------------- win rate


def win_rate(scores_a: Sequence, scores_b: Sequence, tie_tolerance: float = 0.0) -> dict:
    """Paired win rate of A over B.

    For each prompt i with both scores present, d_i = a_i - b_i is a
    win if d_i > tol, a loss if d_i < -tol, and a tie otherwise (|d_i| <= tol).
    With n such prompts::

        win_rate = (wins + 0.5 * ties) / n

    Pairs where either score is ``None`` are dropped and counted in
    ``skipped``. Returns ``{"win", "tie", "loss", "n", "skipped", "win_rate"}``.
    """
    if len(scores_a) != len(scores_b):
        raise DataError(
            f"win_rate: {len(scores_a)} scores for A but {len(scores_b)} for B; they must be paired"
        )
    if tie_tolerance < 0:
        raise DataError(f"win_rate: tie_tolerance must be >= 0, got {tie_tolerance}")
    keep = [i for i, (a, b) in enumerate(zip(scores_a, scores_b)) if a is not None and b is not None]
    skipped = len(scores_a) - len(keep)
    if not keep:
        raise DataError(f"win_rate: no prompt has a score for both A and B ({skipped} skipped)")
    a = _finite_array([scores_a[i] for i in keep], "win_rate scores_a")
    b = _finite_array([scores_b[i] for i in keep], "win_rate scores_b")
    out = _win_counts(a - b, tie_tolerance)
    out["skipped"] = skipped
    return out


def _win_counts(diff: np.ndarray, tol: float) -> dict:
    wins = int(np.sum(diff > tol))
    losses = int(np.sum(diff < -tol))
    n = int(diff.size)
    ties = n - wins - losses
    return {"win": wins, "tie": ties, "loss": losses, "n": n, "win_rate": (wins + 0.5 * ties) / n}


def win_rate_with_ci(
    scores_a: Sequence,
    scores_b: Sequence,
    tie_tolerance: float = 0.0,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """``win_rate`` plus a paired percentile-bootstrap confidence interval.

    Prompts are resampled with replacement, keeping each prompt's (a_i, b_i)
    pair together, and the win rate is recomputed on every resample; the CI
    is the [(1-c)/2, (1+c)/2] quantiles of those win rates (see
    ``bootstrap_ci``). Adds ``ci_low``, ``ci_high``, ``confidence``,
    ``n_resamples`` and ``tie_rate = ties / n`` to ``win_rate``'s dict.
    """
    point = win_rate(scores_a, scores_b, tie_tolerance)
    keep = [i for i, (a, b) in enumerate(zip(scores_a, scores_b)) if a is not None and b is not None]
    a = np.asarray([scores_a[i] for i in keep], dtype=np.float64)
    b = np.asarray([scores_b[i] for i in keep], dtype=np.float64)
    ci = bootstrap_ci(
        (a, b),
        lambda x, y: _win_counts(x - y, tie_tolerance)["win_rate"],
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
    )
    return {
        **point,
        "tie_rate": point["tie"] / point["n"],
        "ci_low": ci["low"],
        "ci_high": ci["high"],
        "confidence": confidence,
        "n_resamples": n_resamples,
    }


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    data: Sequence | np.ndarray | tuple,
    statistic: Callable[..., float] = np.mean,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap confidence interval of ``statistic(data)``.

    ``data`` is one 1-D sequence of values, or a tuple of equal-length 1-D
    sequences that are *paired* (resampled with the same indices, so row i
    of every array stays together); ``statistic`` receives one array, or one
    array per element of the tuple, and returns a number.

    For r = 1..R: draw n indices uniformly with replacement, theta*_r =
    statistic(data[idx]). With alpha = 1 - confidence::

        low  = quantile(theta*, alpha / 2)
        high = quantile(theta*, 1 - alpha / 2)

    (numpy's default linear-interpolation quantile). ``seed`` makes the
    resamples repeat. Returns ``{"estimate", "low", "high", "confidence",
    "n_resamples", "n"}`` where ``estimate`` is the statistic on the full data.
    """
    if not 0.0 < confidence < 1.0:
        raise DataError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise DataError(f"bootstrap_ci: n_resamples must be >= 1, got {n_resamples}")
    paired = isinstance(data, tuple)
    arrays = [_finite_array(x, "bootstrap_ci data") for x in (data if paired else (data,))]
    n = len(arrays[0])
    if any(arr.ndim != 1 for arr in arrays):
        raise DataError("bootstrap_ci: each data array must be 1-D")
    if any(len(arr) != n for arr in arrays):
        raise DataError(f"bootstrap_ci: paired arrays differ in length: {[len(arr) for arr in arrays]}")
    if n == 0:
        raise DataError("bootstrap_ci: no data")

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    thetas = np.fromiter(
        (float(statistic(*(arr[row] for arr in arrays))) for row in idx), dtype=np.float64, count=n_resamples
    )
    alpha = 1.0 - confidence
    low, high = np.quantile(thetas, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {
        "estimate": float(statistic(*arrays)),
        "low": float(low),
        "high": float(high),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "n": n,
    }


# --------------------------------------------------------------------------- KL


def _per_token(values: Any, what: str) -> np.ndarray:
    """A (N, T) float array from an (N, T) array, an (N,) array, or a ragged list of lists (padded with 0)."""
    if isinstance(values, (list, tuple)) and values and all(isinstance(v, (list, tuple)) for v in values):
        width = max((len(v) for v in values), default=0)
        padded = [list(v) + [0.0] * (width - len(v)) for v in values]
        return _finite_array(padded, what).reshape(len(values), width)
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().double().numpy()
    arr = _finite_array(values, what)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{what}: expected shape (samples,) or (samples, tokens), got {arr.shape}")
    return arr


def kl_monte_carlo(logp_policy: Any, logp_ref: Any, mask: Any = None) -> dict:
    """Monte-Carlo estimate of KL(pi || ref) from sequences *sampled from pi*.

    Inputs are log-probs of the sampled tokens under the policy and under the
    reference, shape (N samples, T tokens) with ``mask`` (1 = a sampled
    completion token, 0 = padding), or shape (N,) of per-sequence sums, or
    ragged lists of per-token values (the mask is then built from lengths).
    With r_t = log pi(x_t | x_<t) - log ref(x_t | x_<t) over masked tokens:

    * k1 (unbiased, can be negative per sample)::

          k1_i = sum_t r_t ,          KL ~= mean_i k1_i

      because KL(pi || ref) = E_{x ~ pi}[log pi(x) - log ref(x)] and
      log pi(x) = sum_t log pi(x_t | x_<t).

    * k3 (unbiased, every term >= 0, lower variance; Schulman 2020,
      "Approximating KL divergence")::

          k3_i = sum_t [exp(-r_t) - 1 + r_t]

      Per token, E_{x_t ~ pi}[ref/pi - 1] = 0 so each term's expectation is
      the per-position KL; summed over positions it is the sequence KL.
      (Given per-sequence sums, r is the whole-sequence log ratio and the
      same formula is the sequence-level k3.)

    Returns ``{"k1", "k1_stderr", "k3", "k3_stderr", "n"}``; a standard
    error is std_i(k_i, ddof=1) / sqrt(N) (0 when N = 1).
    """
    ragged = (
        isinstance(logp_policy, (list, tuple)) and logp_policy and isinstance(logp_policy[0], (list, tuple))
    )
    pol = _per_token(logp_policy, "kl_monte_carlo logp_policy")
    ref = _per_token(logp_ref, "kl_monte_carlo logp_ref")
    if pol.shape != ref.shape:
        raise DataError(f"kl_monte_carlo: logp_policy shape {pol.shape} != logp_ref shape {ref.shape}")
    if mask is None:
        if ragged:
            lengths = [len(v) for v in logp_policy]
            if lengths != [len(v) for v in logp_ref]:
                raise DataError("kl_monte_carlo: ragged logp_policy and logp_ref differ in sequence lengths")
            m = (np.arange(pol.shape[1])[None, :] < np.asarray(lengths)[:, None]).astype(np.float64)
        else:
            m = np.ones_like(pol)
    else:
        m = _per_token(mask, "kl_monte_carlo mask")
        if m.shape != pol.shape:
            raise DataError(f"kl_monte_carlo: mask shape {m.shape} != log-prob shape {pol.shape}")
    n = pol.shape[0]
    if n == 0:
        raise DataError("kl_monte_carlo: no samples")
    r = (pol - ref) * m
    k1 = r.sum(axis=1)
    k3 = ((np.exp(-r) - 1.0 + r) * m).sum(axis=1)

    def stderr(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    return {
        "k1": float(k1.mean()),
        "k1_stderr": stderr(k1),
        "k3": float(k3.mean()),
        "k3_stderr": stderr(k3),
        "n": n,
    }


# --------------------------------------------------------------------------- text statistics


def distinct_n(texts: Sequence[str], n: int, tokenize: Callable[[str], list] = str.split) -> float:
    """Distinct-n diversity over a set of texts (Li et al. 2016).

    Each text is split into tokens (whitespace by default) and its n-grams
    are taken within the text (never across texts)::

        distinct_n = |unique n-grams over all texts| / (total n-grams over all texts)

    Returns 0.0 when the texts hold no n-gram at all.
    """
    if n < 1:
        raise DataError(f"distinct_n: n must be >= 1, got {n}")
    seen: set[tuple] = set()
    total = 0
    for text in texts:
        tokens = tokenize(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def mean_std(values: Sequence) -> dict:
    """Mean and population standard deviation of the non-``None`` values.

    With the k values x_1..x_k that are not None::

        mean = sum x_i / k ,   std = sqrt(sum (x_i - mean)^2 / k)

    Returns ``{"mean", "std", "n", "n_none"}``; mean and std are ``None``
    when k = 0. A NaN or infinity raises ``DataError``.
    """
    present = [v for v in values if v is not None]
    n_none = len(values) - len(present)
    if not present:
        return {"mean": None, "std": None, "n": 0, "n_none": n_none}
    arr = _finite_array(present, "mean_std values")
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size), "n_none": n_none}


_INT_RE = re.compile(r"-?\d+")


def first_integer(text: str | None) -> int | None:
    """The first integer (optional leading minus, then digits) in ``text``, or ``None``.

    ``"The answer is 42."`` -> 42; ``"-7 apples"`` -> -7; ``"no digits"`` -> None.
    """
    if text is None:
        return None
    match = _INT_RE.search(text)
    return int(match.group()) if match else None


def accuracy(predictions: Sequence, answers: Sequence) -> float:
    """Exact-match accuracy: (number of i with predictions[i] == answers[i]) / n.

    A ``None`` prediction (e.g. nothing parsed from a completion) is wrong.
    """
    if len(predictions) != len(answers):
        raise DataError(f"accuracy: {len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        raise DataError("accuracy: no examples")
    correct = sum(1 for p, a in zip(predictions, answers) if p is not None and p == a)
    return correct / len(answers)


def perplexity_from_nll(total_nll: float, total_tokens: int) -> float:
    """Token-level perplexity from a summed negative log-likelihood (natural log)::

    perplexity = exp(total_nll / total_tokens)
    """
    if total_tokens <= 0:
        raise DataError(f"perplexity_from_nll: total_tokens must be > 0, got {total_tokens}")
    if not math.isfinite(total_nll):
        raise DataError(f"perplexity_from_nll: total_nll is not finite ({total_nll})")
    return math.exp(total_nll / total_tokens)
