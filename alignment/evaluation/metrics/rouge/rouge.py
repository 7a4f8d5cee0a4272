"""ROUGE through Google's rouge_score, as a local `evaluate` module.

The hub's ``rouge`` cannot be fetched offline; load this one with
``alignment.evaluation.load_metric("rouge")``.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """\
ROUGE-N and ROUGE-L (Lin 2004) F-measures from the rouge_score package,
averaged over prediction/reference pairs. rouge_score lowercases and keeps
only alphanumeric tokens; rougeLsum splits summaries on newlines.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str), references (list of str): one reference per prediction.
    rouge_types (list of str, default ["rouge1", "rouge2", "rougeL", "rougeLsum"]).
    use_stemmer (bool, default False): Porter-stem tokens before matching.
    use_aggregator (bool, default True): mean over pairs; False returns one list per type.
Returns:
    {rouge_type: mean F-measure} (or {rouge_type: [F-measure per pair]})
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, Chin-Yew. ROUGE: A Package for Automatic Evaluation of Summaries. 2004.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True):
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"])
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
        per_pair = {t: [] for t in rouge_types}
        for pred, ref in zip(predictions, references):
            scores = scorer.score(ref, pred)  # rouge_score's order is (target, prediction)
            for t in rouge_types:
                per_pair[t].append(scores[t].fmeasure)
        if not use_aggregator:
            return per_pair
        return {t: (sum(v) / len(v) if v else 0.0) for t, v in per_pair.items()}
