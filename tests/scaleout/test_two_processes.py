"""Two CPU processes (DDP over gloo) give the same training as one process with twice the accumulation."""

import json
import os
import subprocess
import sys

import pytest

SFT = ["recipes/tiny/sft.yaml", "data.max_samples=256", "eval.max_samples=8", "options.evaluate_before=false",
       "train.max_steps=6", "train.logging_steps=1", "train.save_steps=100", "train.per_device_train_batch_size=4",
       "train.lr_scheduler_type=constant", "train.warmup_steps=0"]


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, cwd, processes: int):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    if processes == 1:
        command = [sys.executable, "-m", "alignment.cli", "run", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={free_port()}", "--master_addr=127.0.0.1", "-m", "alignment.cli", "run", *args]
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_sft_two_processes_equal_one_process_with_double_accumulation(tmp_path, repo_root):
    two, one = tmp_path / "two", tmp_path / "one"
    launch(SFT + [f"output_dir={two}"], repo_root, processes=2)
    launch(SFT + [f"output_dir={one}", "train.gradient_accumulation_steps=2"], repo_root, processes=1)
    assert len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    from alignment.checkpoint import is_complete

    assert is_complete(two) and is_complete(one)
