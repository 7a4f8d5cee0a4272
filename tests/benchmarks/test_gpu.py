"""benchmarks/gpu.py and gpu.sh: the no-GPU line, the plan, the model shape, the table, and the whole path on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[2]


def test_qwen2_shape_is_qwen2_05b():
    """The config alone (meta device, no weights) has Qwen2-0.5B's 494,032,768 parameters and its settings."""
    import torch
    from transformers import AutoModelForCausalLM

    from policies.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    config = gpu.shape_config("qwen2-0.5b", tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (896, 4864, 24)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (14, 2, 151936)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 1e6
    assert config.eos_token_id == tokenizer.eos_token_id and len(tokenizer) < config.vocab_size
    with pytest.raises(KeyError, match="unknown shape"):
        gpu.shape_config("qwen2-7b", tokenizer)


def test_gpu_sh_without_a_gpu_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no GPU:") and "--dry-run-cpu" in lines[0]


def test_gpu_plan_fits_ten_minutes_and_sets_the_gpu_sides():
    plan = gpu.make_plan(False, cuda=True, use_vllm=True, vllm_note="vllm importable", peer_problem=None)
    assert plan.shape == "qwen2-0.5b" and plan.precision == "bf16" and plan.device == "cuda"
    assert plan.estimate_s() <= plan.deadline <= 600
    assert "use_vllm=true" in plan.ours_set("ppo") and plan.ours_set("sft") == []
    sft_peer = gpu._command(plan, "sft", "peer", Path("a.json"), Path("/tmp/r"), None)
    assert sft_peer[sft_peer.index("--peer-set") + 1] == "use_cpu=false"  # workloads pins the peer to the CPU
    assert sft_peer[sft_peer.index("--precision") + 1] == "bf16" and "--batch" not in sft_peer
    ppo_peer = gpu._command(plan, "ppo", "peer", Path("a.json"), Path("/tmp/r"), Path("/peer/python"))
    assert ppo_peer[0] == "/peer/python" and json.loads(ppo_peer[ppo_peer.index("--peer-set") + 1]) == {
        "use_cpu": False}
    ppo_ours = gpu._command(plan, "ppo", "ours", Path("a.json"), Path("/tmp/r"), None)
    assert "use_vllm=true" in ppo_ours

    without = gpu.make_plan(False, cuda=True, use_vllm=False, vllm_note="vllm is not installed",
                            peer_problem="no venv")
    assert without.ours_set("ppo") == [] and "transformers rollouts" in without.describe()
    assert without.estimate_s() < plan.estimate_s()  # the missing PPO peer is not budgeted
    dry = gpu.make_plan(True, cuda=False)
    assert dry.device == "cpu" and dry.peer_set() == [] and dry.batch["grpo"] % 8 == 0
    with pytest.raises(ValueError, match="no CUDA GPU"):
        gpu.make_plan(False, cuda=False)
    assert gpu.vllm_state("cpu") == (False, "vLLM needs a CUDA GPU")


def test_table_rows_ratios_and_reasons():
    runs = [
        {"stage": "sft", "side": "ours", "status": "ok", "tokens_per_s": 2000.0, "cuda_peak_mb": 3000.0,
         "peak_rss_mb": 9.0, "mfu": 0.25, "steps": 20},
        {"stage": "sft", "side": "peer", "status": "ok", "tokens_per_s": 1000.0, "cuda_peak_mb": 6000.0,
         "peak_rss_mb": 9.0, "mfu": 0.125, "steps": 20},
        {"stage": "ppo", "side": "ours", "status": "error", "error": "RuntimeError: boom\ntraceback"},
        {"stage": "ppo", "side": "peer", "status": "unavailable", "error": "the trl 1.12.0 venv is not built"},
    ]
    rows = gpu.table_rows(runs, "cuda")
    ratio = next(r for r in rows if r["side"] == "ours/peer")
    assert ratio["stage"] == "sft" and ratio["tokens_per_s"] == 2.0 and ratio["memory_mb"] == 0.5
    assert not any(r["side"] == "ours/peer" and r["stage"] == "ppo" for r in rows)
    table = gpu.markdown_table(rows, "cuda")
    assert "| sft | ours/peer | **2.00x** | **0.50x** |" in table
    assert "| sft | ours | 2,000 | 3,000 | 25.00% | 20 | |" in table
    assert "error: RuntimeError: boom |" in table and "unavailable: the trl 1.12.0 venv is not built" in table
    assert "max_memory_allocated" in table
    assert "peak RSS" in gpu.markdown_table(gpu.table_rows(runs, "cpu"), "cpu")


@pytest.mark.slow
def test_dry_run_cpu_runs_every_stage_through_the_gpu_path(tmp_path):
    """The GPU path end to end on the CPU (~90 s on a shared 2-core machine): every stage ours and peer."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--dry-run-cpu", "--output", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [report_path] = tmp_path.glob("gpu-dry-cpu-*.json")
    report = json.loads(report_path.read_text())
    assert report["verified_on_gpu"] is False and report["ceiling_key"] == "cpu_bf16"
    assert report["assets"]["model_vocab_size"] > report["assets"]["vocab_size"]
    runs = {(r["stage"], r["side"]): r for r in report["runs"]}
    for stage in gpu.STAGES:
        ours = runs[(stage, "ours")]
        assert ours["status"] == "ok", ours.get("error")
        assert ours["tokens_per_s"] > 0 and 0 < ours["mfu"] < 1 and ours["device"] == "cpu"
        assert ours["cuda_peak_mb"] is None and ours["steps"] == gpu.DRY_STEPS[stage]
    for stage in ("sft", "dpo", "grpo"):
        peer = runs[(stage, "peer")]
        assert peer["status"] == "ok", peer.get("error")
        assert peer["settings"]["bf16"] is True and peer["settings"]["use_cpu"] is True
    assert runs[("ppo", "peer")]["status"] in ("ok", "unavailable")
    assert runs[("ppo", "ours")]["settings"]["mixed_precision"] == "bf16"  # the peer's precision, not fp32
    ratios = [r for r in report["rows"] if r["side"] == "ours/peer"]
    assert {r["stage"] for r in ratios} >= {"sft", "dpo", "grpo"} and all(r["tokens_per_s"] > 0 for r in ratios)
    markdown = report_path.with_suffix(".md").read_text()
    assert "| sft | ours/peer |" in markdown and "| ppo | ours |" in markdown
