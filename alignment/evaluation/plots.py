"""PNG plots for evaluation reports: score distributions per checkpoint, and training curves.

Figures are drawn with matplotlib's object API on the Agg canvas, never
through ``pyplot``, so importing or calling this module never changes the
process's matplotlib backend and works on machines without a display.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alignment.errors import DataError

__all__ = ["TRAINING_PANELS", "plot_score_distributions", "plot_training_curves", "read_metrics_jsonl"]

log = logging.getLogger(__name__)

# (panel title, y-axis label, metric keys drawn in it, in order of preference). A panel no run logs is left out.
TRAINING_PANELS: list[tuple[str, str, tuple[str, ...]]] = [
    ("Reward", "mean reward per batch", ("reward/total", "objective/score", "reward")),
    # kl/per_sequence: every RL stage logs it (alignment.metrics); trl's own `kl` is per token, another unit
    ("KL to reference", "KL (nats per response)", ("kl/per_sequence", "objective/kl")),
    ("Loss", "training loss", ("loss", "train/loss")),
    ("Held-out accuracy", "accuracy", ("eval/greedy_accuracy", "eval/accuracy")),  # eval.every_steps
]

_DISCRETE_MAX_VALUES = 6  # at most this many distinct scores: draw bars of frequencies instead of violins


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- score distributions


def plot_score_distributions(results: Mapping, path: str | os.PathLike) -> Path:
    """One panel per reward source; in it, one distribution per checkpoint.

    Reads ``results["checkpoints"][name]["scores"][source]`` (per-prompt
    scores; ``None`` entries are dropped and shown as "unscored"), as written by
    ``report.write_report``'s schema. Continuous scores are drawn as violins
    with the median, interquartile range and mean marked; scores with few distinct values (e.g. 0/1
    correctness) as grouped bars of the fraction of prompts at each value.
    Returns the PNG path.
    """
    checkpoints = results.get("checkpoints") or {}
    names = list(checkpoints)
    sources = sorted({s for n in names for s in (checkpoints[n].get("scores") or {})})
    if not sources:
        raise DataError("plot_score_distributions: no checkpoint has per-prompt 'scores' to plot")

    cols = min(len(sources), 2)
    rows = math.ceil(len(sources) / cols)
    fig = _new_figure(min(max(6.0, 2.5 + 1.7 * len(names)), 12.0) * cols, 4.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colors = [f"C{i % 10}" for i in range(len(names))]
    for ax, source in zip(axes, sources):
        data, missing = {}, {}
        for n in names:
            raw = (checkpoints[n].get("scores") or {}).get(source)
            if raw is None:
                continue
            values = np.asarray([v for v in raw if v is not None], dtype=np.float64)
            data[n] = values[np.isfinite(values)]
            missing[n] = len(raw) - len(data[n])  # None (no score) and, should any slip through, non-finite
        distinct = np.unique(np.concatenate([v for v in data.values()])) if data else np.array([])
        if len(distinct) and len(distinct) <= _DISCRETE_MAX_VALUES:
            _draw_discrete(ax, data, missing, distinct, colors, names)
        else:
            _draw_violins(ax, data, missing, colors, names)
        ax.set_title(f"Scores from '{source}'")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(sources) :]:
        ax.set_visible(False)
    title = results.get("title") or "Score distributions"
    fig.suptitle(f"{title}: per-prompt scores by checkpoint", fontsize=13)
    return _save(fig, path)


def _summary(values: np.ndarray, n_missing: int) -> str:
    """'mean 0.62, n=199, 1 unscored': the numbers a reader needs next to a distribution."""
    extra = f", {n_missing} unscored" if n_missing else ""
    return f"mean {values.mean():.3g}, n={len(values)}{extra}"


def _draw_violins(ax, data: dict, missing: dict, colors: list[str], names: list[str]) -> None:
    present = [n for n in names if n in data and len(data[n])]
    positions = np.arange(1, len(present) + 1)
    if present:
        multi = [n for n in present if len(np.unique(data[n])) > 1]  # a violin needs spread
        if multi:
            parts = ax.violinplot(
                [data[n] for n in multi],
                positions=[positions[present.index(n)] for n in multi],
                showextrema=False,
                widths=0.8,
            )
            for body, n in zip(parts["bodies"], multi):
                body.set_facecolor(colors[names.index(n)])
                body.set_edgecolor("black")
                body.set_alpha(0.55)
        for pos, n in zip(positions, present):
            q1, med, q3 = np.percentile(data[n], [25, 50, 75])
            ax.vlines(
                pos, q1, q3, color="black", linewidth=4, label="interquartile range" if pos == 1 else None
            )
            ax.scatter(
                [pos],
                [med],
                color="white",
                edgecolor="black",
                zorder=3,
                s=30,
                label="median" if pos == 1 else None,
            )
            ax.scatter(
                [pos],
                [data[n].mean()],
                marker="D",
                color="red",
                zorder=4,
                s=30,
                label="mean" if pos == 1 else None,
            )
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks(
        positions,
        [f"{n}\n{_summary(data[n], missing[n]).replace(', ', chr(10), 1)}" for n in present],
        fontsize=9,
    )
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("score")


def _draw_discrete(
    ax, data: dict, missing: dict, values: np.ndarray, colors: list[str], names: list[str]
) -> None:
    present = [n for n in names if n in data and len(data[n])]
    width = 0.8 / max(len(present), 1)
    x = np.arange(len(values))
    for i, n in enumerate(present):
        freq = np.array([(data[n] == v).mean() for v in values])
        bars = ax.bar(
            x - 0.4 + width * (i + 0.5),
            freq,
            width,
            color=colors[names.index(n)],
            label=f"{n} ({_summary(data[n], missing[n])})",
        )
        ax.bar_label(bars, labels=[f"{f:.0%}" for f in freq], fontsize=8, padding=1)
    ax.set_xticks(x, [f"{v:g}" for v in values])
    ax.set_xlabel("score")
    ax.set_ylabel("fraction of prompts")
    ax.set_ylim(0, 1.12)
    ax.legend(loc="upper left", fontsize=8)


# --------------------------------------------------------------------------- training curves


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` (one per logged step).

    Blank lines are ignored; a line that is not a JSON object (e.g. a last
    line cut short by a kill) is skipped with a warning, not an error.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d is not valid JSON; skipped", path, lineno)
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                log.warning("%s:%d is not a JSON object; skipped", path, lineno)
    return records


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key over the records that log it as a finite number."""
    steps, values = [], []
    for i, rec in enumerate(records):
        v = rec.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        step = rec.get("step", i)
        steps.append(step if isinstance(step, (int, float)) else i)
        values.append(float(v))
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps, dtype=np.float64)[order], np.asarray(values)[order]


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (no lag); the window shrinks symmetrically at the ends."""
    half = max(window // 2, 1)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    half_here = np.minimum(half, np.minimum(idx, len(values) - 1 - idx))
    lo, hi = idx - half_here, idx + half_here + 1
    return (csum[hi] - csum[lo]) / (hi - lo)


def plot_training_curves(run_dirs: Sequence | Mapping, path: str | os.PathLike) -> Path:
    """Reward, KL, loss (and held-out accuracy) over training steps for several runs.

    ``run_dirs`` is a list of run directories (labelled by their names) or a
    ``{label: directory}`` dict; each directory's ``metrics.jsonl`` holds one
    JSON object per logged step with ``"step"`` and keys such as
    ``"reward/total"``, ``"objective/score"``, ``"objective/kl"``, ``"loss"``,
    ``"eval/greedy_accuracy"`` (eval.every_steps; see ``TRAINING_PANELS``). Each panel is drawn for the
    runs that log one of its keys; panels no run logs, runs without the file,
    and missing keys are skipped (with a log message). Noisy series (more
    than 30 points) are drawn faint with a bold centred moving average on top.
    Raises ``DataError`` only if nothing at all can be plotted.
    """
    runs = dict(run_dirs) if isinstance(run_dirs, Mapping) else {Path(d).name or str(d): d for d in run_dirs}
    records: dict[str, list[dict]] = {}
    for label, directory in runs.items():
        file = Path(directory) / "metrics.jsonl"
        if not file.is_file():
            log.warning("no %s; run %r left out of the training curves", file, label)
            continue
        records[label] = read_metrics_jsonl(file)

    panels = []
    for title, ylabel, keys in TRAINING_PANELS:
        lines = []
        for label, recs in records.items():
            for key in keys:
                steps, values = _series(recs, key)
                if len(values):
                    lines.append((label, key, steps, values))
        if lines:
            panels.append((title, ylabel, lines))
    if not panels:
        known = sorted({k for _, _, keys in TRAINING_PANELS for k in keys})
        raise DataError(
            f"plot_training_curves: none of the runs {list(runs)} has a metrics.jsonl logging any of {known}"
        )

    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure(6.4 * cols, 4.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    run_color = {label: f"C{i % 10}" for i, label in enumerate(records)}
    styles = ["-", "--", ":", "-."]
    for ax, (title, ylabel, lines) in zip(axes, panels):
        keys_here = list(dict.fromkeys(key for _, key, _, _ in lines))
        for label, key, steps, values in lines:
            name = label if len(keys_here) == 1 else f"{label}: {key}"
            style = styles[keys_here.index(key) % len(styles)]
            color = run_color[label]
            if len(values) > 30:
                ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=1)
                ax.plot(
                    steps,
                    _moving_average(values, max(5, len(values) // 20)),
                    style,
                    color=color,
                    linewidth=2,
                    label=f"{name} (moving avg)",
                )
            else:
                ax.plot(
                    steps,
                    values,
                    style,
                    color=color,
                    linewidth=2,
                    marker="o" if len(values) < 15 else None,
                    markersize=4,
                    label=name,
                )
        key_note = keys_here[0] if len(keys_here) == 1 else ", ".join(keys_here)
        ax.set_title(f"{title} ({key_note})")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Training curves", fontsize=13)
    return _save(fig, path)
