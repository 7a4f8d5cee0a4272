"""Evaluation of aligned checkpoints: statistics, metrics, generation, reports and plots.

Submodules (imported on demand, so ``import alignment.evaluation`` stays cheap):

* ``stats``    - small pure functions (win rate, bootstrap CI, KL estimates, distinct-n, ...)
* ``metrics/`` - local ``evaluate`` modules, loaded with :func:`load_metric`
* ``generate`` - batched generation, sequence log-probs and text NLL with transformers
* ``report``   - ``report.json`` + ``report.md`` from a results dict (schema in its docstring)
* ``plots``    - score distributions and training curves as PNGs

The package is not named ``evaluate`` so it never shadows the library.
"""

from __future__ import annotations

from pathlib import Path

from alignment.errors import AlignmentError

METRICS_DIR = Path(__file__).resolve().parent / "metrics"

__all__ = ["METRICS_DIR", "available_metrics", "load_metric"]


def available_metrics() -> list[str]:
    """Names of the local metric modules shipped in ``alignment/evaluation/metrics/``."""
    if not METRICS_DIR.is_dir():
        return []
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **kwargs):
    """Load one of the shipped metrics as an ``evaluate.EvaluationModule``, offline.

    ``evaluate.load("bleu")`` fetches from the hub; this loads
    ``metrics/<name>/<name>.py`` from the installed package instead. Extra
    keyword arguments go to ``evaluate.load`` (results are kept in memory by
    default, so no cache files are written next to other processes').
    Unknown names raise ``AlignmentError`` listing the valid ones.
    """
    names = available_metrics()
    if name not in names:
        raise AlignmentError(f"unknown metric {name!r}; available metrics: {', '.join(names) or '(none)'}")
    import evaluate  # heavy import (datasets, pyarrow): only when a metric is needed

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
