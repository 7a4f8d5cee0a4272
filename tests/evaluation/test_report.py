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
    assert paths == {"json": tmp_path / "eval" / "report.json", "md": tmp_path / "eval" / "report.md",
                     "html": tmp_path / "eval" / "report.html"}
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


def test_html_report_is_one_file_with_its_plots_and_tables(tmp_path):
    """report.html: the metrics table and the samples of report.md, its plots inside it (no file beside it)."""
    import base64
    import re
    from html.parser import HTMLParser

    from alignment.evaluation.plots import plot_score_distributions

    results = example_results()
    out = tmp_path / "eval"
    plot_score_distributions(results, out / "scores.png")
    results["plots"] = {"Score distributions": "scores.png", "Missing": "gone.png"}
    results["checkpoints"]["dpo"]["samples"][0]["completion"] = "<script>alert(1)</script>"
    html = write_report(results, out)["html"].read_text()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.images, self.cells, self._cell = [], [], [], None

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            if tag in ("td", "th"):
                self._cell = ""

        def handle_data(self, data):
            if self._cell is not None:
                self._cell += data

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.cells.append(self._cell)
                self._cell = None

    page = Collect()
    page.feed(html)
    assert "script" not in page.tags and "link" not in page.tags  # nothing to fetch, nothing to run
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # a completion is text, never markup
    assert len(page.images) == 1 and page.images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(page.images[0].split(",", 1)[1]) == (out / "scores.png").read_bytes()
    assert "gone.png was not found beside the report" in html
    dpo = results["checkpoints"]["dpo"]["metrics"]
    for label in ("Greedy accuracy", "Win rate vs sft by correct [95% CI]", "KL to sft, k1 (± s.e.)", "EOS rate"):
        assert label in page.cells, label
    row = page.cells.index("Greedy accuracy")
    assert page.cells[row + 2] == f"{100 * dpo['greedy_accuracy']:.1f}%"  # the sft cell, then dpo's
    assert "What is 0 + 3?" in page.cells
    assert len(re.findall(r"<tr>", html.split("Sample completions")[1])) == 1 + 40  # header + every sample
