"""Plots render to non-trivial PNGs and skip what is missing."""

import json
import logging

import numpy as np
import pytest

from alignment.errors import DataError
from alignment.evaluation.plots import plot_score_distributions, plot_training_curves, read_metrics_jsonl

from .conftest import example_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(directory, n_steps, *, with_kl=True, seed=0, extra_lines=()):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "metrics.jsonl", "w") as f:
        for step in range(1, n_steps + 1):
            rec = {
                "step": step,
                "loss": 2.0 / step**0.5 + 0.05 * rng.normal(),
                "reward/total": 1 - np.exp(-step / 40) + 0.1 * rng.normal(),
            }
            if with_kl:
                rec["objective/kl"] = 0.002 * step + 0.01 * abs(rng.normal())
            if step % 25 == 0:
                rec["eval/accuracy"] = min(0.9, 0.3 + step / 400)
            f.write(json.dumps(rec) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return directory


def test_score_distributions_png(tmp_path):
    out = plot_score_distributions(example_results(), tmp_path / "scores.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_score_distributions_needs_scores(tmp_path):
    with pytest.raises(DataError, match="scores"):
        plot_score_distributions({"checkpoints": {"a": {"metrics": {}}}}, tmp_path / "x.png")


def test_training_curves_png_and_missing_pieces(tmp_path, caplog):
    grpo = write_run(tmp_path / "grpo", 120, extra_lines=['{"step": 121, "loss": 0.'])  # cut-off last line
    dpo = write_run(tmp_path / "dpo", 12, with_kl=False, seed=1)
    empty = tmp_path / "never_started"
    empty.mkdir()
    with caplog.at_level(logging.WARNING):
        out = plot_training_curves([grpo, dpo, empty], tmp_path / "curves.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert "never_started" in caplog.text and "not valid JSON" in caplog.text
    assert len(read_metrics_jsonl(grpo / "metrics.jsonl")) == 120
    with pytest.raises(DataError, match="none of the runs"):
        plot_training_curves({"empty": empty}, tmp_path / "none.png")
