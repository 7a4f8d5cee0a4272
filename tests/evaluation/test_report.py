"""report.json keeps every number; report.md is a readable side-by-side table."""

import json
import math

import numpy as np
import pytest

from alignment.errors import DataError
from alignment.evaluation.report import render_markdown, write_report

from .conftest import example_results


def test_report_files_hold_every_number(tmp_path):
    results = example_results()
    results["checkpoints"]["dpo"]["metrics"]["odd"] = np.float32(float("nan"))
    paths = write_report(results, tmp_path / "eval")
    assert paths == {"json": tmp_path / "eval" / "report.json", "md": tmp_path / "eval" / "report.md"}
    saved = json.loads(paths["json"].read_text())
    assert saved["checkpoints"]["dpo"]["metrics"]["win_rate"]["correct"] == pytest.approx(
        results["checkpoints"]["dpo"]["metrics"]["win_rate"]["correct"]
    )
    assert saved["checkpoints"]["sft"]["scores"]["reward_model"][3] is None
    assert saved["checkpoints"]["dpo"]["metrics"]["odd"] == "nan"  # JSON has no NaN; kept as a string
    assert saved["spec"] == results["spec"] and saved["seeds"] == results["seeds"] and "created" in saved
    assert not list((tmp_path / "eval").glob(".*tmp"))  # no temporary files left behind


def test_markdown_table_has_a_column_per_checkpoint_and_every_row():
    results = example_results()
    md = render_markdown(results)
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric | `sft` | `dpo` |"
    for label in (
        "Greedy accuracy",
        "Sampled accuracy",
        "Reward `correct` (mean ± std)",
        "Reward `reward_model` (mean ± std)",
        "Win rate vs `sft` by `correct` [95% CI]",
        "KL to `sft`, k1 (± s.e.)",
        "Perplexity",
        "Mean length (tokens)",
        "Distinct-1",
        "Distinct-2",
        "EOS rate",
        "`format_ok`",
    ):
        assert f"| {label} |" in md, label
    dpo = results["checkpoints"]["dpo"]["metrics"]
    w = dpo["win_rate"]["correct"]
    row = next(line for line in md.splitlines() if line.startswith("| Win rate vs `sft` by `correct`"))
    assert row.split(" | ")[1] == "(baseline)"
    assert (
        f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}], ties {100 * w['tie_rate']:.1f}%" in row
    )
    acc = next(line for line in md.splitlines() if line.startswith("| Greedy accuracy"))
    assert f"{100 * dpo['greedy_accuracy']:.1f}%" in acc
    kl = next(line for line in md.splitlines() if line.startswith("| KL to `sft`, k1"))
    assert "0 (reference)" in kl and "0.420 ± 0.050" in kl


def test_markdown_samples_side_by_side_and_escaped():
    md = render_markdown(example_results(), max_samples=3)
    section = md.split("## Sample completions")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows[1:]) == 3  # alignment row, then three samples
    first = rows[1]
    assert "What is 0 + 3?" in first and "| 3 |" in first
    assert "7 \\| 8<br>nine ✗" in first  # a pipe and a newline cannot break the table
    assert "(3 of 40 samples shown" in section


def test_missing_metrics_and_bad_results():
    minimal = {"checkpoints": {"only": {"path": "x", "metrics": {"perplexity": 12.5}}}}
    md = render_markdown(minimal)
    assert "| Perplexity | 12.500 |" in md and "Greedy accuracy" not in md and "Sample completions" not in md
    with pytest.raises(DataError, match="non-empty"):
        render_markdown({"checkpoints": {}})
    with pytest.raises(DataError, match="baseline.*checkpoints: only"):
        render_markdown({**minimal, "baseline": "nope"})
    assert math.isfinite(minimal["checkpoints"]["only"]["metrics"]["perplexity"])


def test_accuracy_cell_says_how_many_samples_failed_and_counts_are_not_rows_of_their_own():
    results = example_results()
    results["checkpoints"]["sft"]["metrics"].update(greedy_accuracy=0.5, greedy_accuracy_scored=498,
                                                    greedy_accuracy_failed=2)
    results["checkpoints"]["dpo"]["metrics"].update(greedy_accuracy_scored=500, greedy_accuracy_failed=0)
    md = render_markdown(results)
    acc = next(line for line in md.splitlines() if line.startswith("| Greedy accuracy"))
    sft_cell, dpo_cell = acc.split(" | ")[1:3]
    assert sft_cell == "50.0% (2 failed, of 500)"
    assert "failed" not in dpo_cell  # nothing failed: the plain percentage
    assert "accuracy_scored" not in md and "accuracy_failed" not in md
