"""Paired win rate of checkpoint A over checkpoint B with a bootstrap confidence interval.

A local `evaluate` module (load it with ``alignment.evaluation.load_metric("win_rate")``).
"""

import datasets
import evaluate

from alignment.evaluation.stats import win_rate_with_ci

_DESCRIPTION = """\
Paired win rate: for each prompt i scored for both checkpoints, A wins if
a_i - b_i > tie_tolerance, loses if a_i - b_i < -tie_tolerance, ties
otherwise; win_rate = (wins + 0.5 * ties) / n. The confidence interval is a
percentile bootstrap over prompts (pairs resampled together). Prompts where
either score is missing (None) are skipped and counted.
"""

_KWARGS_DESCRIPTION = """
Args:
    scores_a (list of float or None): per-prompt scores of the candidate.
    scores_b (list of float or None): per-prompt scores of the baseline, same prompts, same order.
    tie_tolerance (float, default 0.0), n_resamples (int, default 1000),
    confidence (float, default 0.95), seed (int, default 0).
Returns:
    win_rate, win, tie, loss, n, skipped, tie_rate, ci_low, ci_high, confidence, n_resamples
Example:
    >>> load_metric("win_rate").compute(scores_a=[1.0, 0.0, 2.0], scores_b=[0.0, 0.0, 3.0])["win_rate"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"scores_a": datasets.Value("float64"), "scores_b": datasets.Value("float64")}
            ),
        )

    def _compute(self, scores_a, scores_b, tie_tolerance=0.0, n_resamples=1000, confidence=0.95, seed=0):
        return win_rate_with_ci(
            list(scores_a),
            list(scores_b),
            tie_tolerance,
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
        )
