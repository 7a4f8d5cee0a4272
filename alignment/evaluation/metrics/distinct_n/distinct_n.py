"""Distinct-n diversity of a set of completions.

A local `evaluate` module (load it with ``alignment.evaluation.load_metric("distinct_n")``).
"""

import datasets
import evaluate

from alignment.evaluation.stats import distinct_n

_DESCRIPTION = """\
Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for
Neural Conversation Models"): the number of unique n-grams over all
predictions divided by the total number of n-grams, with whitespace
tokens and n-grams taken within each prediction. 1.0 means no n-gram is
repeated anywhere in the set; values near 0 mean the completions repeat.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): completions.
    n (int or list of int, default (1, 2)): the n-gram orders to report.
Returns:
    distinct_<n> (float) for each requested n.
Example:
    >>> load_metric("distinct_n").compute(predictions=["a b a", "a c"], n=[1, 2])
    {'distinct_1': 0.6, 'distinct_2': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DistinctN(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, n=(1, 2)):
        orders = [n] if isinstance(n, int) else list(n)
        return {f"distinct_{k}": distinct_n(predictions, k) for k in orders}
