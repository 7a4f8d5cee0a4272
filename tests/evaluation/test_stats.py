"""The evaluation statistics against numbers worked by hand or by exact enumeration."""

import itertools
import math

import numpy as np
import pytest

from alignment.errors import DataError
from alignment.evaluation import stats

# --------------------------------------------------------------------------- win rate


def test_win_rate_counts_by_hand():
    a = [3.0, 1.0, 2.0, 2.0]
    b = [1.0, 1.0, 3.0, 2.05]
    # differences 2, 0, -1, -0.05
    exact = stats.win_rate(a, b)
    assert (exact["win"], exact["tie"], exact["loss"], exact["n"]) == (1, 1, 2, 4)
    assert exact["win_rate"] == pytest.approx((1 + 0.5 * 1) / 4)
    tolerant = stats.win_rate(a, b, tie_tolerance=0.1)  # -0.05 becomes a tie
    assert (tolerant["win"], tolerant["tie"], tolerant["loss"]) == (1, 2, 1)
    assert tolerant["win_rate"] == pytest.approx(0.5)


def test_win_rate_skips_missing_scores_and_rejects_bad_input():
    out = stats.win_rate([1.0, None, 0.0], [0.0, 5.0, None])
    assert (out["n"], out["skipped"], out["win_rate"]) == (1, 2, 1.0)
    with pytest.raises(DataError, match="paired"):
        stats.win_rate([1.0], [1.0, 2.0])
    with pytest.raises(DataError, match="non-finite"):
        stats.win_rate([float("nan")], [1.0])
    with pytest.raises(DataError, match="no prompt"):
        stats.win_rate([None], [1.0])


def test_win_rate_is_antisymmetric():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 3, 50).tolist(), rng.integers(0, 3, 50).tolist()
    assert stats.win_rate(a, b)["win_rate"] + stats.win_rate(b, a)["win_rate"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_matches_enumerated_bootstrap_distribution():
    # data [0, 0, 1]: the number k of ones in a resample is Binomial(3, 1/3), mean = k/3 with
    # P = 8/27, 12/27, 6/27, 1/27 for k = 0..3; CDF = .296, .741, .963, 1.
    # 90% CI: the 5% quantile is 0 (CDF(0) = .296 >= .05); the 95% quantile is 2/3 (CDF(1/3) = .741 < .95 <= .963).
    ci = stats.bootstrap_ci([0.0, 0.0, 1.0], np.mean, n_resamples=20000, confidence=0.90, seed=1)
    assert ci["estimate"] == pytest.approx(1 / 3)
    assert ci["low"] == pytest.approx(0.0)
    assert ci["high"] == pytest.approx(2 / 3)


def test_bootstrap_ci_degenerate_and_seeded():
    assert stats.bootstrap_ci([2.0] * 5)["low"] == stats.bootstrap_ci([2.0] * 5)["high"] == 2.0
    data = np.random.default_rng(3).normal(size=40)
    assert stats.bootstrap_ci(data, seed=7) == stats.bootstrap_ci(data, seed=7)
    assert stats.bootstrap_ci(data, seed=7) != stats.bootstrap_ci(data, seed=8)


def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = stats.bootstrap_ci(rng.normal(size=20), np.mean, n_resamples=2000)
    large = stats.bootstrap_ci(rng.normal(size=2000), np.mean, n_resamples=2000)
    for ci in (small, large):
        assert ci["low"] <= ci["estimate"] <= ci["high"]
    # the CI width of a mean shrinks like 1/sqrt(n): 100x the data, ~10x narrower
    ratio = (small["high"] - small["low"]) / (large["high"] - large["low"])
    assert 5 < ratio < 20
    # and for the mean of N(0, 1) the 95% CI half-width is about 1.96 / sqrt(n)
    assert (large["high"] - large["low"]) / 2 == pytest.approx(1.96 / math.sqrt(2000), rel=0.15)


def test_bootstrap_ci_paired_resamples_rows_together():
    x = np.arange(10.0)
    # y == x row for row, so every paired resample has mean(x - y) == 0; unpaired resampling would not
    ci = stats.bootstrap_ci((x, x.copy()), lambda a, b: float(np.mean(a - b)), n_resamples=200)
    assert ci["low"] == ci["high"] == 0.0
    with pytest.raises(DataError, match="differ in length"):
        stats.bootstrap_ci((x, x[:5]), lambda a, b: 0.0)


def test_win_rate_with_ci_by_enumeration():
    # outcomes per prompt: win, tie, win -> 1, 0.5, 1; point estimate 5/6.
    # The number k of ties in a resample is Binomial(3, 1/3): win rate (3 - k/2)/3 = 1, 5/6, 2/3, 1/2
    # with P = 8/27, 12/27, 6/27, 1/27. 90% CI: 5% quantile 2/3 (CDF(1/2) = .037 < .05 <= CDF(2/3) = .259),
    # 95% quantile 1 (CDF(5/6) = .704 < .95).
    out = stats.win_rate_with_ci([1.0, 0.0, 1.0], [0.0, 0.0, 0.0], n_resamples=20000, confidence=0.90, seed=0)
    assert out["win_rate"] == pytest.approx(5 / 6)
    assert out["tie_rate"] == pytest.approx(1 / 3)
    assert out["ci_low"] == pytest.approx(2 / 3)
    assert out["ci_high"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- KL

P1, P2 = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.6, 0.3])  # policy: two independent tokens
Q1, Q2 = np.array([0.2, 0.5, 0.3]), np.array([0.3, 0.3, 0.4])  # reference


def _exact_kl() -> float:
    """KL(pi || ref) = sum over all 9 sequences x of pi(x) log(pi(x) / ref(x))."""
    total = 0.0
    for x1, x2 in itertools.product(range(3), range(3)):
        p, q = P1[x1] * P2[x2], Q1[x1] * Q2[x2]
        total += p * math.log(p / q)
    return total


def test_exact_kl_enumeration_is_sum_of_per_token_kls():
    per_token = sum(float(np.sum(p * np.log(p / q))) for p, q in ((P1, Q1), (P2, Q2)))
    assert _exact_kl() == pytest.approx(per_token)


def test_kl_estimators_are_exactly_unbiased_over_all_sequences():
    # E_{x ~ pi}[k(x)] computed by enumeration must equal the exact KL for both estimators
    exp_k1 = exp_k3 = 0.0
    for x1, x2 in itertools.product(range(3), range(3)):
        weight = P1[x1] * P2[x2]
        lp = [[math.log(P1[x1]), math.log(P2[x2])]]
        lq = [[math.log(Q1[x1]), math.log(Q2[x2])]]
        est = stats.kl_monte_carlo(lp, lq)
        assert est["k3"] >= 0.0
        exp_k1 += weight * est["k1"]
        exp_k3 += weight * est["k3"]
    assert exp_k1 == pytest.approx(_exact_kl(), abs=1e-12)
    assert exp_k3 == pytest.approx(_exact_kl(), abs=1e-12)


def test_sampled_kl_estimate_agrees_with_exact_kl():
    rng = np.random.default_rng(0)
    n = 20000
    x1, x2 = rng.choice(3, size=n, p=P1), rng.choice(3, size=n, p=P2)
    # third column is padding with junk values that the mask must exclude
    logp = np.stack([np.log(P1[x1]), np.log(P2[x2]), np.full(n, -50.0)], axis=1)
    logq = np.stack([np.log(Q1[x1]), np.log(Q2[x2]), np.zeros(n)], axis=1)
    mask = np.ones_like(logp)
    mask[:, 2] = 0
    est = stats.kl_monte_carlo(logp, logq, mask)
    exact = _exact_kl()
    assert est["n"] == n
    assert abs(est["k1"] - exact) < 4 * est["k1_stderr"]
    assert abs(est["k3"] - exact) < 4 * est["k3_stderr"]
    assert est["k1_stderr"] < 0.01  # the check above is not vacuous
    # per-sequence sums give the same k1
    assert stats.kl_monte_carlo(logp[:, :2].sum(1), logq[:, :2].sum(1))["k1"] == pytest.approx(est["k1"])


def test_kl_estimate_ragged_lists_and_identical_models():
    ragged_p = [[-1.0, -2.0], [-0.5]]
    ragged_q = [[-1.5, -2.0], [-0.25]]
    est = stats.kl_monte_carlo(ragged_p, ragged_q)
    assert est["k1"] == pytest.approx(((0.5 + 0.0) + (-0.25)) / 2)
    same = stats.kl_monte_carlo(ragged_p, ragged_p)
    assert same["k1"] == same["k3"] == 0.0
    with pytest.raises(DataError, match="shape"):
        stats.kl_monte_carlo(np.zeros((2, 3)), np.zeros((2, 2)))


# --------------------------------------------------------------------------- text and simple statistics


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique of 6
    assert stats.distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 unique of 4; never across texts
    assert stats.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert stats.distinct_n(texts, 3) == 1.0
    assert stats.distinct_n(["a a a a"], 1) == 0.25
    assert stats.distinct_n(["", "one"], 2) == 0.0
    assert stats.distinct_n(["abca"], 1, tokenize=list) == 0.75


def test_mean_std_ignores_none():
    assert stats.mean_std([1.0, None, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2, "n_none": 1}
    assert stats.mean_std([None]) == {"mean": None, "std": None, "n": 0, "n_none": 1}
    with pytest.raises(DataError, match="non-finite"):
        stats.mean_std([1.0, float("inf")])


def test_accuracy_first_integer_and_perplexity():
    assert stats.first_integer("The answer is 42.") == 42
    assert stats.first_integer("-7 apples, 3 pears") == -7
    assert stats.first_integer("no digits") is None
    assert stats.accuracy([5, None, 3, 4], [5, 2, 3, 5]) == 0.5
    assert stats.perplexity_from_nll(4 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(DataError):
        stats.perplexity_from_nll(1.0, 0)
