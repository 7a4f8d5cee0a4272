"""`align eval --judge`: LLM-judged win rates between checkpoints, each pair in both orders."""

import argparse
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.reward.test_reward_judge import Judge  # noqa: E402
from tests.reward.test_reward_remote import ServerThread  # noqa: E402

from .conftest import save_tiny_checkpoints  # noqa: E402


def test_eval_judge_writes_a_pairwise_table_with_both_order_agreement(tmp_path):
    from alignment.evaluation.runner import evaluate_checkpoints

    paths, spec = save_tiny_checkpoints(tmp_path / "ckpts", "data: data/tiny_arith/eval.jsonl\nmax_samples: 4\n"
                                        "max_new_tokens: 4\nbatch_size: 4\nperplexity: false\n"
                                        "rewards: [{source: answer_match}]\n")
    always_first = Judge(lambda text: "A")  # a judge with nothing but position bias
    server = ServerThread(always_first.app())
    try:
        evaluate_checkpoints(paths, spec_path=spec, output_dir=tmp_path / "eval", baseline="base",
                             pairwise_judge={"endpoint": server.url})
    finally:
        server.stop()
    assert len(always_first.requests) == 8  # 4 prompts, both orders
    table = json.loads((tmp_path / "eval" / "report.json").read_text())["pairwise"]["other"]
    assert table == {"n": 4, "wins": 0, "losses": 0, "ties": 0, "inconsistent": 4, "unparseable": 0,
                     "win_rate": 0.5, "agreement": 0.0, "first_position_rate": 1.0}
    md = (tmp_path / "eval" / "pairwise.md").read_text()
    assert "| other | 4 | 0 | 0 | 0 | 4 | 0 | 50.0% | 0.0% | 100.0% |" in md
    assert md in (tmp_path / "eval" / "report.md").read_text()


def test_judge_option_parses_to_endpoint_or_local_model():
    from alignment.evaluation import runner

    parser = argparse.ArgumentParser()
    runner.add_command(parser.add_subparsers())
    args = parser.parse_args(["eval", "a", "--output", "o", "--judge", "http://127.0.0.1:8000", "--judge-model", "q"])
    assert runner.judge_options(args.judge, args.judge_model) == {"endpoint": "http://127.0.0.1:8000", "model_name": "q"}
    assert runner.judge_options("runs/judge", None) == {"model": "runs/judge"}
    assert runner.judge_options(None, None) is None


@pytest.mark.slow  # a subprocess loading two models: ~10 s
def test_align_eval_cli_with_judge_writes_pairwise_md(tmp_path, repo_root):
    import subprocess
    import sys

    paths, spec = save_tiny_checkpoints(tmp_path / "ckpts", "data: data/tiny_arith/eval.jsonl\nmax_samples: 3\n"
                                        "max_new_tokens: 3\nbatch_size: 3\nperplexity: false\n"
                                        "rewards: [{source: answer_match}]\n")
    judge = Judge(lambda text: "tie")
    server = ServerThread(judge.app())
    try:
        out = subprocess.run([sys.executable, "-m", "alignment.cli", "eval", paths["base"], paths["other"], "--spec",
                              spec, "--output", str(tmp_path / "eval"), "--judge", server.url, "--judge-model", "j"],
                             capture_output=True, text=True, cwd=repo_root, timeout=300)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(judge.requests) == 6 and {r["model"] for r in judge.requests} == {"j"}
    assert "| other | 3 | 0 | 0 | 3 | 0 | 0 | 50.0% | 100.0% | - |" in (tmp_path / "eval" / "pairwise.md").read_text()
