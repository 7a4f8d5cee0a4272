"""Verifiable accuracy: the first integer in each prediction equals the reference answer.

A local `evaluate` module (load it with ``alignment.evaluation.load_metric("verifiable_accuracy")``).
"""

import datasets
import evaluate

from alignment.evaluation.stats import accuracy, first_integer

_DESCRIPTION = """\
Exact-match accuracy on integer answers. Each prediction (a completion) is
parsed as the first integer it contains (optional minus sign, then digits);
the prediction is correct when that integer equals the reference answer.
A completion with no integer is wrong.

    accuracy    = (# predictions whose first integer == reference) / n
    parsed_rate = (# predictions that contain an integer) / n
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): completions.
    references (list of int): the correct answers.
Returns:
    accuracy (float), parsed_rate (float), n (int)
Example:
    >>> m = load_metric("verifiable_accuracy")
    >>> m.compute(predictions=["42", "It is 7.", "none"], references=[42, 8, 1])
    {'accuracy': 0.3333333333333333, 'parsed_rate': 0.6666666666666666, 'n': 3}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VerifiableAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        parsed = [first_integer(p) for p in predictions]
        n = len(references)
        return {
            "accuracy": accuracy(parsed, [int(r) for r in references]),
            "parsed_rate": sum(p is not None for p in parsed) / n,
            "n": n,
        }
