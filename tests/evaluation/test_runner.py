"""`align eval` end to end on two tiny random checkpoints (seconds)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import save_tiny_checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    paths, spec = save_tiny_checkpoints(
        tmp_path_factory.mktemp("ckpts"),
        "data: data/tiny_arith/eval.jsonl\nmax_samples: 12\nmax_new_tokens: 4\nbatch_size: 6\n"
        "bootstrap_resamples: 200\nrewards: [{source: answer_match}, {source: length_target, "
        "kwargs: {target: 2}}]\njudge: length_target\n")
    return paths, Path(spec)


def test_eval_writes_report_with_every_metric(two_checkpoints, tmp_path):
    from alignment.evaluation.runner import evaluate_checkpoints

    paths, spec = two_checkpoints
    report = evaluate_checkpoints(paths, spec_path=str(spec), output_dir=tmp_path, baseline="base")
    for name in ("report.json", "report.md", "scores.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 100, name
    saved = json.loads((tmp_path / "report.json").read_text())
    base, other = saved["checkpoints"]["base"]["metrics"], saved["checkpoints"]["other"]["metrics"]
    # KL of the reference to itself is exactly zero; to a different random model it is not
    assert base["kl_to_reference"]["k1"] == pytest.approx(0.0, abs=1e-6)
    assert other["kl_to_reference"]["k3"] > 0.01
    win = other["win_rate"]["length_target"]
    assert win["ci_low"] <= win["win_rate"] <= win["ci_high"] and win["n"] == 12
    assert "win_rate" not in base
    for metrics in (base, other):
        assert 0.0 <= metrics["greedy_accuracy"] <= 1.0 and 0.0 <= metrics["sampled_accuracy"] <= 1.0
        assert metrics["perplexity"] > 1.0 and 0 <= metrics["eos_rate"] <= 1
        assert "bleu" in metrics and "rouge1" in metrics and "distinct_1" in metrics
    assert "greedy acc" in report["table"] and "other" in report["table"]
    assert "| other" in (tmp_path / "report.md").read_text() or "other" in (tmp_path / "report.md").read_text()


def test_eval_cli_names_a_missing_checkpoint(tmp_path, repo_root):
    out = subprocess.run([sys.executable, "-m", "alignment.cli", "eval", str(tmp_path / "nope"), "--output",
                          str(tmp_path / "o"), "--spec", "recipes/tiny/eval.yaml"], capture_output=True, text=True,
                         cwd=repo_root, timeout=120)
    assert out.returncode == 2 and "no such directory" in out.stderr and "Traceback" not in out.stderr
