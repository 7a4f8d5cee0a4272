"""`align pipeline` stopped during its PPO stage (SIGINT, and separately `kill -9`), then run again.

Real processes: the pipeline runs as `python -m alignment.cli pipeline FILE` in a child; when the PPO
stage has written its second checkpoint the child gets the signal. Running the same command again
must skip the finished SFT stage (its run directory untouched), resume PPO from its newest whole
checkpoint, run the stages after it, and end with the same PPO policy as an uninterrupted pipeline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

SFT = ["train.max_steps=4", "train.per_device_train_batch_size=8", "data.max_samples=64", "eval=null",
       "train.save_steps=100", "options.evaluate_before=false"]
PPO = ["train.total_steps=8", "train.batch_size=8", "train.mini_batch_size=4", "train.ppo_epochs=1",
       "data.max_samples=64", "eval=null", "options.save_steps=1", "options.save_total_limit=2",
       "options.progress_bar=false", "train.logging_steps=1"]
DPO = ["train.max_steps=2", "train.per_device_train_batch_size=8", "data.max_samples=32", "eval=null",
       "options.kl_samples=0"]
PPO_STEPS = 8


def write_pipeline(root):
    text = f"""# align pipeline {root}/pipeline.yaml
output_root: {root}/runs
stages:
  - {{name: sft, recipe: recipes/tiny/sft.yaml, overrides: {json.dumps(SFT)}}}
  - {{name: ppo, recipe: recipes/tiny/ppo_rule.yaml, inputs: {{model.name_or_path: sft}}, overrides: {json.dumps(PPO)}}}
  - {{name: dpo, recipe: recipes/tiny/dpo.yaml, inputs: {{model.name_or_path: sft}}, overrides: {json.dumps(DPO)}}}
"""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.yaml").write_text(text)
    return root / "pipeline.yaml"


def command(pipeline):
    return [sys.executable, "-m", "alignment.cli", "pipeline", str(pipeline)]


def child_env():
    # one thread: the interrupted and the uninterrupted runs must do the same float arithmetic
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_to_end(pipeline, repo_root, log_name: str) -> str:
    out = subprocess.run(command(pipeline), cwd=repo_root, env=child_env(), capture_output=True, text=True,
                         timeout=600)
    (pipeline.parent / log_name).write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def stop_during_ppo(pipeline, repo_root, sig: int) -> int:
    """Start the pipeline, send `sig` once PPO has written checkpoint-2, return the child's exit code."""
    checkpoint = pipeline.parent / "runs" / "ppo" / "checkpoints" / "checkpoint-2"
    log = (pipeline.parent / "stopped.log").open("w")
    child = subprocess.Popen(command(pipeline), cwd=repo_root, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    try:
        while not checkpoint.is_dir() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, "the pipeline ended before PPO wrote checkpoint-2: " + \
            (pipeline.parent / "stopped.log").read_text()[-3000:]
        assert checkpoint.is_dir(), "PPO never wrote checkpoint-2"
        child.send_signal(sig)
        return child.wait(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, repo_root):
    pipeline = write_pipeline(tmp_path_factory.mktemp("straight"))
    run_to_end(pipeline, repo_root, "run.log")
    return pipeline.parent / "runs"


def ppo_log(runs):
    lines = (runs / "ppo" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "kill-9"])
def test_pipeline_interrupted_during_ppo_continues_and_matches_an_uninterrupted_run(sig, uninterrupted, tmp_path,
                                                                                    repo_root):
    from safetensors.torch import load_file

    from alignment.checkpoint import is_complete

    pipeline = write_pipeline(tmp_path)
    runs = tmp_path / "runs"
    code = stop_during_ppo(pipeline, repo_root, sig)
    if sig == signal.SIGINT:
        from alignment.guards import EXIT_INTERRUPTED

        # the step finished and saved; exit 75 (resumable), not 0, so a shell `&&` does not run the next command
        assert code == EXIT_INTERRUPTED, (tmp_path / "stopped.log").read_text()[-3000:]
        assert "interrupted" in (tmp_path / "stopped.log").read_text()
    else:
        assert code == -signal.SIGKILL
    assert is_complete(runs / "sft") and not is_complete(runs / "ppo") and not (runs / "dpo").exists()
    sft_info = (runs / "sft" / "run_info.json").stat().st_mtime_ns
    stopped_at = len(ppo_log(runs))
    assert 2 <= stopped_at < PPO_STEPS

    output = run_to_end(pipeline, repo_root, "rerun.log")
    assert "skipped" in output.split("[1/3] sft")[1].split("[2/3]")[0]  # SFT not redone
    assert "resuming from" in output.split("[2/3] ppo")[1].split("[3/3]")[0]
    assert (runs / "sft" / "run_info.json").stat().st_mtime_ns == sft_info
    assert all(is_complete(runs / name) for name in ("sft", "ppo", "dpo"))

    resumed, straight = ppo_log(runs), ppo_log(uninterrupted)
    assert [line["step"] for line in resumed] == list(range(1, PPO_STEPS + 1))  # no step lost or repeated
    assert [line["objective/score"] for line in resumed] == pytest.approx(
        [line["objective/score"] for line in straight], abs=1e-6)
    assert [line["objective/kl"] for line in resumed] == pytest.approx(
        [line["objective/kl"] for line in straight], abs=1e-5)
    ours, theirs = (load_file(str(r / "ppo" / "model.safetensors")) for r in (runs, uninterrupted))
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= 1e-5, f"resumed PPO policy differs from the uninterrupted one by {worst}"
