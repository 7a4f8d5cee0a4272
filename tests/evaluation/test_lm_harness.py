"""`align eval --lm-eval`: lm-evaluation-harness scores in the report, or a clean `skipped` without the package."""

import json
import sys
import types

import pytest

from .conftest import save_tiny_checkpoints

TASKS = ["arc_easy", "hellaswag"]


def harness_output(task_names):
    """What lm_eval 0.4's simple_evaluate returns (trimmed): results per task plus bookkeeping."""
    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.25, "acc_stderr,none": 0.0435, "acc_norm,none": 0.3,
                     "acc_norm_stderr,none": 0.046},
        "hellaswag": {"alias": "hellaswag", "acc,none": 0.2, "acc_stderr,none": "N/A", "acc_norm,none": 0.4,
                      "acc_norm_stderr,none": 0.049},
    }
    return {
        "results": {t: results[t] for t in task_names},
        "group_subtasks": {t: [] for t in task_names},
        "configs": {t: {"task": t, "num_fewshot": 0, "output_type": "multiple_choice"} for t in task_names},
        "versions": {t: 1.0 for t in task_names},
        "n-shot": {t: 0 for t in task_names},
        "higher_is_better": {t: {"acc": True, "acc_norm": True} for t in task_names},
        "n-samples": {t: {"original": 2376, "effective": 5} for t in task_names},
        "config": {"model": "hf", "batch_size": 1, "device": "cpu", "limit": 5.0},
        "git_hash": None,
        "date": 1735689600.0,
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("ckpts"),
                                 "data: data/tiny_arith/eval.jsonl\nmax_samples: 4\nmax_new_tokens: 3\nbatch_size: 4\n"
                                 "bootstrap_resamples: 50\nperplexity: false\ntext_metrics: false\n")


def run_cli(paths, spec, out, *extra):
    from alignment.cli import main

    return main(["eval", *paths.values(), "--spec", spec, "--output", str(out), *extra])


def test_without_lm_eval_the_report_says_skipped_and_the_rest_goes_on(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    paths, spec = checkpoints
    assert run_cli(paths, spec, tmp_path, "--lm-eval", "arc_easy") == 0

    assert "lm-eval: skipped: the lm_eval package is not installed (pip install lm-eval)" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["lm_eval"] == {"tasks": ["arc_easy"], "limit": None, "status": "skipped",
                                 "reason": "the lm_eval package is not installed (pip install lm-eval)"}
    for entry in report["checkpoints"].values():
        assert 0.0 <= entry["metrics"]["greedy_accuracy"] <= 1.0
    markdown = (tmp_path / "report.md").read_text()
    assert "## lm-evaluation-harness" in markdown and "Skipped: the lm_eval package is not installed" in markdown


def test_with_lm_eval_its_results_go_into_the_report(checkpoints, tmp_path, monkeypatch):
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return harness_output(kwargs["tasks"])

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    paths, spec = checkpoints
    assert run_cli(paths, spec, tmp_path, "--lm-eval", "arc_easy, hellaswag", "--lm-eval-limit", "5") == 0

    assert len(calls) == 2
    for call, path in zip(calls, paths.values()):
        assert call["model"] == "hf" and call["model_args"]["pretrained"] == path
        assert call["tasks"] == TASKS and call["limit"] == 5 and call["device"] in ("cpu", "cuda")
    section = json.loads((tmp_path / "report.json").read_text())["lm_eval"]
    assert section["status"] == "ok" and section["tasks"] == TASKS and section["limit"] == 5
    other = section["checkpoints"]["other"]["tasks"]
    assert other["arc_easy"] == {"acc,none": 0.25, "acc_stderr,none": 0.0435, "acc_norm,none": 0.3,
                                 "acc_norm_stderr,none": 0.046}
    assert other["hellaswag"]["acc,none"] == 0.2 and "acc_stderr,none" not in other["hellaswag"]  # "N/A" dropped
    markdown = (tmp_path / "report.md").read_text()
    assert "| task | metric | `base` | `other` |" in markdown
    assert "| arc_easy | acc | 0.2500 ± 0.0435 | 0.2500 ± 0.0435 |" in markdown
    assert "| hellaswag | acc | 0.2000 | 0.2000 |" in markdown
    assert "at most 5 examples per task" in markdown


def test_a_failing_task_is_recorded_not_raised():
    from alignment.evaluation.lm_harness import checkpoint_scores, markdown

    def simple_evaluate(**kwargs):
        raise KeyError("no task named 'arc_eassy'")

    entry = checkpoint_scores(simple_evaluate, "runs/x", ["arc_eassy"], None, "cpu")
    assert entry == {"error": "KeyError: \"no task named 'arc_eassy'\""}
    text = "\n".join(markdown({"status": "ok", "device": "cpu", "checkpoints": {"x": entry}}))
    assert "`x`: failed: KeyError" in text


def test_lm_eval_limit_must_be_positive(checkpoints, tmp_path, capsys):
    paths, spec = checkpoints
    with pytest.raises(SystemExit) as stop:
        run_cli(paths, spec, tmp_path, "--lm-eval", "arc_easy", "--lm-eval-limit", "0")
    assert stop.value.code == 2 and "--lm-eval-limit" in capsys.readouterr().err
