"""Checklist items 28 and 29: `kill -9` during a checkpoint write, then resume, mid-epoch and at an epoch boundary.

A real `align run` process is killed with SIGKILL while it writes a checkpoint:
slow_save_child.py runs the CLI with that one save paused (after the weights and
optimizer are written, before the RNG state and trainer_state.json) and
announced on stdout, so the kill lands mid-write every time.  The
resumed loss curve must match an uninterrupted run with the same seed step by
step.  NEFTune noise (train.neftune_noise_alpha) draws from the global RNG at
every step, so the curves only match when the trainer restores the RNG state as
well as the data order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.checkpoint import is_complete, latest_checkpoint

from .conftest import loss_curve, run_sft

# 16 rows in batches of 8: an epoch is 2 steps; 6 steps cross two epoch boundaries.
SETTINGS = [
    "data.max_samples=16",
    "eval=null",
    "options.evaluate_before=false",
    "train.per_device_train_batch_size=8",
    "train.max_steps=6",
    "train.logging_steps=1",
    "train.learning_rate=1e-2",
    "train.lr_scheduler_type=constant",
    "train.warmup_steps=0",
    "train.neftune_noise_alpha=5",
    "train.disable_tqdm=true",
]
MAX_STEPS = 6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_sft(run_dir, *SETTINGS, "train.save_steps=1000")
    curve = loss_curve(run_dir)
    assert sorted(curve) == list(range(1, MAX_STEPS + 1))
    return run_dir, curve


def kill_during_checkpoint_write(run_dir, repo_root, save_steps: int, kill_at: int) -> list[str]:
    """Run `align run` in a child process and SIGKILL it while it writes checkpoint-<kill_at>."""
    import threading

    child_script = Path(__file__).with_name("slow_save_child.py")
    args = [sys.executable, str(child_script), f"120@{kill_at}", "run", "recipes/tiny/sft.yaml",
            f"output_dir={run_dir}", *SETTINGS, f"train.save_steps={save_steps}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(repo_root))
    stderr_path = run_dir.parent / "child-stderr.log"
    with open(stderr_path, "w") as stderr:
        child = subprocess.Popen(args, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        watchdog = threading.Timer(300, child.kill)  # never hang the suite
        watchdog.start()
        seen, killed_mid_write = [], False
        try:
            for line in child.stdout:
                seen.append(line)
                if line.startswith("SLOW_SAVE: writing") and line.rstrip().endswith(
                        f"checkpoint-{kill_at}"):
                    os.kill(child.pid, signal.SIGKILL)  # kill -9, while the checkpoint is half written
                    killed_mid_write = True
                    break
        finally:
            watchdog.cancel()
            if child.poll() is None and not killed_mid_write:
                child.kill()
            child.wait(timeout=60)
    assert killed_mid_write and child.returncode == -signal.SIGKILL, "".join(seen) + stderr_path.read_text()
    return seen


def resumed_part(run_dir) -> list[int]:
    """Steps logged after the last restart (metrics.jsonl is appended to across a resume)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    restart = max(i for i, record in enumerate(records) if "data/rows" in record)  # the data audit opens each run
    return [r["step"] for r in records[restart:] if "loss" in r]


def assert_same_curve(resumed: dict, reference: dict) -> None:
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), (step, resumed, reference)


@pytest.mark.parametrize(
    "save_steps, kill_at, resume_at",
    [(3, 6, 3),   # resume mid-epoch (step 3 is the first batch of epoch 2): one batch skipped, then a new epoch
     (2, 4, 2)],  # resume exactly at the end of the first epoch (verl #7401 ran 0 steps here and exited 0)
    ids=["mid_epoch", "epoch_boundary"],
)
def test_item_28_29_kill_9_during_checkpoint_write_then_resume(tmp_path, repo_root, uninterrupted, capsys,
                                                                save_steps, kill_at, resume_at):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    kill_during_checkpoint_write(run_dir, repo_root, save_steps, kill_at)

    # what the kill left: a partial checkpoint that looks like one, and the previous one whole
    partial = run_dir / "checkpoints" / f"checkpoint-{kill_at}"
    assert (partial / "model.safetensors").is_file(), "the kill must land after the weights were written"
    assert not (partial / "trainer_state.json").exists() and not (partial / "rng_state.pth").exists()
    previous = run_dir / "checkpoints" / f"checkpoint-{resume_at}"
    assert latest_checkpoint(run_dir) == previous
    state = json.loads((previous / "trainer_state.json").read_text())
    assert state["global_step"] == resume_at
    assert (previous / "rng_state.pth").is_file() and load_file(previous / "model.safetensors")
    assert not is_complete(run_dir)
    killed_curve = loss_curve(run_dir)
    assert max(killed_curve) == kill_at  # the child really trained up to the kill

    # resume: the partial checkpoint is ignored (and removed), the previous one is used
    metrics = run_sft(run_dir, *SETTINGS, f"train.save_steps={save_steps}", "resume=true")
    out = capsys.readouterr().out
    assert f"ignoring {partial}: half-written" in out and f"resuming from {previous}" in out
    assert metrics["train_steps"] == MAX_STEPS and is_complete(run_dir)
    assert resumed_part(run_dir) == list(range(resume_at + 1, MAX_STEPS + 1))  # continued, not 0 steps

    # the curve continues as if uninterrupted: same data order, same RNG draws
    _, reference = uninterrupted
    assert_same_curve(loss_curve(run_dir), reference)


def test_item_29_resume_without_the_rng_state_would_differ(tmp_path, repo_root, uninterrupted):
    """Control: the comparison above can fail. Without the saved RNG state the NEFTune draws differ."""
    run_dir = tmp_path / "run"
    run_sft(run_dir, *SETTINGS, "train.save_steps=3", "train.max_steps=3")
    (run_dir / "checkpoints" / "checkpoint-3" / "rng_state.pth").unlink()
    run_sft(run_dir, *SETTINGS, "train.save_steps=3", "resume=true")
    _, reference = uninterrupted
    resumed = loss_curve(run_dir)
    assert all(resumed[s] == pytest.approx(reference[s], rel=1e-4) for s in (1, 2, 3))
    assert any(resumed[s] != pytest.approx(reference[s], rel=1e-4) for s in range(4, MAX_STEPS + 1))


def test_item_29_resuming_a_finished_run_trains_no_extra_step(tmp_path, uninterrupted):
    """transformers takes one more step when resumed at max_steps; the stage loads the checkpoint instead."""
    source, _ = uninterrupted
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    last = run_dir / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    final = (last / "model.safetensors").read_bytes()
    metrics = run_sft(run_dir, *SETTINGS, "train.save_steps=1000", "resume=true")
    assert metrics["train_steps"] == MAX_STEPS and is_complete(run_dir)
    assert max(loss_curve(run_dir)) == MAX_STEPS
    from safetensors.torch import load_file

    saved, checkpoint = load_file(run_dir / "model.safetensors"), load_file(last / "model.safetensors")
    assert (last / "model.safetensors").read_bytes() == final
    assert all((saved[k] == checkpoint[k]).all() for k in checkpoint)
