"""Two CPU processes (DDP over gloo) give the same training as one process with twice the accumulation.

SFT and DPO (trl's trainers): the same per-device batch, gradient_accumulation_steps doubled in the one
process. PPO (ours): the same rollout batch in total (batch_size doubled in the one process) and
gradient_accumulation_steps doubled. Each is @slow: two launches of about 10-40 s on 2 CPU cores.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

SFT = ["recipes/tiny/sft.yaml", "data.max_samples=256", "eval.max_samples=8", "options.evaluate_before=false",
       "train.max_steps=6", "train.logging_steps=1", "train.save_steps=100", "train.per_device_train_batch_size=4",
       "train.lr_scheduler_type=constant", "train.warmup_steps=0"]
# DPO from a random tiny model (no SFT run needed), a frozen copy as the reference, no held-out passes
DPO = ["recipes/tiny/dpo.yaml", "model.name_or_path=tiny:1m", "data.max_samples=256", "data.eval=null", "eval=null",
       "options.evaluate_before=false", "options.kl_samples=0", "options.reference=copy", "train.max_steps=6",
       "train.logging_steps=1", "train.save_steps=100", "train.per_device_train_batch_size=4"]
# PPO from a random tiny model; batch_size is per process (2 x 8 here, 16 in the one process)
PPO = ["recipes/tiny/ppo_rule.yaml", "model.name_or_path=tiny:1m", "eval.max_samples=8", "options.evaluate_before=false",
       "options.progress_bar=false", "options.save_steps=100", "train.total_steps=4", "train.mini_batch_size=8",
       "train.ppo_epochs=2", "train.generation_chunk_size=4", "train.logging_steps=1"]


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


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


@pytest.mark.slow
def test_dpo_two_processes_equal_one_process_with_double_accumulation(tmp_path, repo_root):
    two, one = tmp_path / "two", tmp_path / "one"
    out = launch(DPO + [f"output_dir={two}"], repo_root, processes=2)
    launch(DPO + [f"output_dir={one}", "train.gradient_accumulation_steps=2"], repo_root, processes=1)
    assert len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert out.stdout.count("dpo done") == 1  # one summary, from the main process
    from alignment.checkpoint import is_complete

    assert is_complete(two) and is_complete(one)


# per-step metrics that are defined over the whole rollout batch (not per micro-batch)
PPO_COMPARED = ["objective/kl", "objective/entropy", "objective/score", "objective/non_score_reward",
                "val/eos_rate", "val/response_length", "value/mean", "value/loss", "train/grad_norm"]


@pytest.mark.slow
def test_ppo_two_processes_equal_one_process_with_double_accumulation(tmp_path, repo_root):
    """2 processes x 8 prompts, accumulation 1 == 1 process x 16 prompts, accumulation 2, step by step.

    What must match, and why it does:
    - the prompts: process r takes positions [(2 s + r) 8, (2 s + r + 1) 8) of step s's seeded permutation,
      the one process [16 s, 16 s + 16): the same 16 prompts (PPOTrainer._batch_rows);
    - the samples: each rank's RNG stream differs (seed + rank), so by design a 2-process run does NOT
      sample what one process would. With `train.generation_chunk_size` set, every chunk of 4 prompts is
      sampled on an RNG seeded from (seed, the chunk's position in the run): the union of the two
      processes' rollouts is exactly the one process's rollout (same prompts, same padding, same chunks);
    - advantages: whitened over the whole batch (means and variance reduced over processes);
    - the update: every process divides its token sum by the mean token count over processes, so the
      all-reduced gradient is the token mean over the whole minibatch, as in one process;
    - the minibatches: mini_batch_size = the per-process batch, so each update sees the whole rollout in
      both layouts (in the one process as two shuffled micro-batches: a different order, the same sum).
      With smaller minibatches the shuffles differ and only statistical agreement is possible.

    Compared: per-step KL, entropy, score, value loss and gradient norm (each step's rollout comes from the
    previous updates, so step 4 matching means the whole trajectory did), then the final weights. Not
    compared: per-micro-batch means (clipfrac, ratio_mean, approx_kl), which depend on how the batch is cut.
    Tolerance: float32 sums in a different order, rel 1e-4 (measured: <= 3e-6; weights <= 2e-7).
    """
    two, one = tmp_path / "two", tmp_path / "one"
    out = launch(PPO + [f"output_dir={two}", "train.batch_size=8"], repo_root, processes=2)
    launch(PPO + [f"output_dir={one}", "train.batch_size=16", "train.gradient_accumulation_steps=2"], repo_root,
           processes=1)
    log_two, log_one = log(two), log(one)
    assert [entry["step"] for entry in log_two] == [1, 2, 3, 4]  # one line per step: only rank 0 writes
    assert log_two[-1]["objective/kl"] != 0.0  # the policy moved away from the reference
    for a, b in zip(log_two, log_one):
        for name in PPO_COMPARED:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), (a["step"], name)
    assert out.stdout.count("ppo done") == 1
    from safetensors.torch import load_file

    from alignment.checkpoint import is_complete

    assert is_complete(two) and is_complete(one)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["checkpoint-4"]
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(two / name), load_file(one / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (name, key)
