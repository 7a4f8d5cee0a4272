"""Corpus BLEU through sacrebleu, as a local `evaluate` module.

The hub's ``bleu`` cannot be fetched offline; load this one with
``alignment.evaluation.load_metric("bleu")``.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """\
Corpus-level BLEU (Papineni et al. 2002) computed by sacrebleu (Post 2018)
with its defaults (13a tokenizer, case-sensitive, no smoothing beyond
sacrebleu's default 'exp'): the geometric mean of modified 1..4-gram
precisions times the brevity penalty. Reported on a 0..1 scale.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): hypotheses.
    references (list of str, or list of list of str): one reference or the same number of references per hypothesis.
    tokenize (str, default "13a"), lowercase (bool, default False): passed to sacrebleu.
Returns:
    bleu (0..1), precisions (list of 4, 0..1), brevity_penalty, length_ratio, translation_length, reference_length
"""

_CITATION = """\
@inproceedings{post-2018-call,
  title = "A Call for Clarity in Reporting {BLEU} Scores",
  author = "Post, Matt",
  booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
  year = "2018",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        counts = {len(r) for r in refs}
        if len(counts) != 1:
            raise ValueError(
                f"bleu: every prediction needs the same number of references, got counts {sorted(counts)}"
            )
        streams = [list(stream) for stream in zip(*refs)]  # sacrebleu wants one list per reference position
        result = sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize, lowercase=lowercase)
        return {
            "bleu": result.score / 100.0,
            "precisions": [p / 100.0 for p in result.precisions],
            "brevity_penalty": result.bp,
            "length_ratio": result.sys_len / result.ref_len if result.ref_len else 0.0,
            "translation_length": result.sys_len,
            "reference_length": result.ref_len,
        }
