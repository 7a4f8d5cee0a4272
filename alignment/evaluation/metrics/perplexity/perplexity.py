"""Perplexity from per-token negative log-likelihoods that the caller already computed.

A local `evaluate` module (load it with ``alignment.evaluation.load_metric("perplexity")``).
Unlike the hub's ``perplexity``, it never downloads a model: get the NLLs from
the model under evaluation (e.g. ``alignment.evaluation.generate.text_nll``).
"""

import math

import datasets
import evaluate

from alignment.evaluation.stats import perplexity_from_nll

_DESCRIPTION = """\
Perplexity from natural-log per-token NLLs, one list per text.

    perplexity      = exp(sum of all NLLs / number of all tokens)     (token-weighted, corpus level)
    perplexities[j] = exp(mean NLL of text j)
    mean_perplexity = mean_j perplexities[j]                          (every text weighs the same)
"""

_KWARGS_DESCRIPTION = """
Args:
    nlls (list of list of float): per-token negative log-likelihoods (nats) of each text.
Returns:
    perplexity (float), mean_perplexity (float), perplexities (list of float), total_tokens (int)
Example:
    >>> import math
    >>> load_metric("perplexity").compute(nlls=[[math.log(2), math.log(2)], [math.log(4)]])["perplexity"]
    2.5198420997897464
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nlls": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, nlls):
        texts = [list(x) for x in nlls if len(x) > 0]
        total_tokens = sum(len(x) for x in texts)
        perplexities = [math.exp(sum(x) / len(x)) for x in texts]
        return {
            "perplexity": perplexity_from_nll(sum(sum(x) for x in texts), total_tokens),
            "mean_perplexity": sum(perplexities) / len(perplexities),
            "perplexities": perplexities,
            "total_tokens": total_tokens,
        }
