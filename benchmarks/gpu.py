"""One GPU run: SFT, DPO, GRPO and PPO of a Qwen2-0.5B-shaped model, ours against trl, in at most 10 minutes.

    bash benchmarks/gpu.sh                          # = python -m benchmarks gpu, under a 600 s timeout
    python -m benchmarks gpu --dry-run-cpu          # the same code path on the CPU: tiny shape, 1-2 steps

What it does, on a machine with a CUDA GPU:

* builds the model from a config (no download): ``Qwen2Config`` with Qwen2-0.5B's shape (hidden 896,
  intermediate 4864, 24 layers, 14 heads, 2 KV heads, tied embeddings, vocabulary 151,936, rope theta 1e6),
  random weights (seed 42), the tokenizer shipped in the repo (``policies/assets/tiny_tokenizer``; its ids
  are all < 151,936, the model's vocabulary keeps the Qwen2 value so the LM head costs what Qwen2's does),
  saved as a directory (a causal LM and a one-label classifier, as :mod:`benchmarks.assets` saves the tiny
  presets: vLLM and trl load from a directory);
* measures the bf16 matmul ceiling of the GPU (:mod:`benchmarks.ceiling`);
* runs each stage once per side through the existing workloads (:mod:`benchmarks.workloads`, one fresh
  process each, :func:`benchmarks.harness.run_child`), bf16 on both sides, the peer with ``use_cpu=False``;
  PPO ours with ``use_vllm=True`` (vLLM colocated on the training GPU) when vllm is importable; the PPO
  peer (trl 1.12.0) only when its venv is already built (``python -m benchmarks peer-env`` needs the
  internet, which a GPU machine here does not have): otherwise the table says why it is missing;
* prints one table: stage, side, train tokens/s, peak GPU memory (``torch.cuda.max_memory_allocated`` at
  the end of the training loop), MFU against the measured ceiling, ours/peer ratios; writes
  ``<output>/gpu-<time>.{json,md}``.

Every run has a timeout and the whole run a 570 s deadline (a run that would start past it is skipped and
the table says so), so ``gpu.sh`` ends inside 10 minutes.  Without a GPU and without ``--dry-run-cpu`` it
prints one line saying so and what it would run, and exits 0 (a skip is not a failure: nothing in the test
suite needs a GPU).

Not run on a GPU yet: the step counts and time estimates below are guesses, not measurements.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("sft", "dpo", "grpo", "ppo")
SIDES = ("ours", "peer")
DEADLINE_S = 570.0  # the whole run, gpu.sh's 600 s timeout minus time to write the table
SEED = 42

# Model shapes built from a config.  qwen2-0.5b: Qwen2-0.5B's config.json values.  qwen2-dry: a few
# thousand parameters for the CPU dry run, with a vocabulary wider than the tokenizer's (~320 ids) like
# the real shape's, so the "model vocabulary > tokenizer vocabulary" case is exercised on the CPU too.
SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, rope_theta=1_000_000.0,
                       max_position_embeddings=32768),
    "qwen2-dry": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, rope_theta=1_000_000.0, max_position_embeddings=512),
}

# Steps per stage.  GPU: guessed so that 8 runs (start-up, steps, DPO's held-out pass: the estimates below)
# fit in DEADLINE_S; not measured on a GPU yet.
GPU_STEPS = {"sft": 20, "dpo": 10, "grpo": 4, "ppo": 4}
# Seconds per run on the GPU.  DPO's is longer because workloads.heldout_preference scores 500 held-out pairs
# after the loop with the starting model loaded on the CPU (untimed, but inside the run): for 0.5B parameters
# and a 151,936-token head that is ~20 TFLOP of CPU work, perhaps a minute.
GPU_TIMEOUT_S = {"sft": 150.0, "dpo": 240.0, "grpo": 150.0, "ppo": 180.0}
DRY_STEPS = {"sft": 2, "dpo": 2, "grpo": 1, "ppo": 1}
# The dry run's batches (the recipes' 64 / 32 would only slow the CPU down); GRPO's must stay a multiple of
# its 8 generations per prompt.  PPO's batch is workloads.PPO_SETTINGS' 8 on both runs.
DRY_BATCH = {"sft": 4, "dpo": 4, "grpo": 8}
# Rough seconds per step and per run start-up, for the estimate printed before the run.  GPU: guesses;
# CPU: the dry shape on a shared 2-core machine (its runs took 8-20 s each, 85 s in all).
SECONDS_PER_STEP = {"cuda": {"sft": 1.0, "dpo": 1.5, "grpo": 4.0, "ppo": 6.0},
                    "cpu": {"sft": 0.5, "dpo": 0.5, "grpo": 2.0, "ppo": 3.0}}
STARTUP_S = {"cuda": 30.0, "cpu": 10.0}  # GPU: imports, CUDA start, loading 2 GB fp32 models, trl's setup
AFTER_LOOP_S = {"cuda": {"dpo": 60.0}, "cpu": {"dpo": 3.0}}  # DPO's held-out pass (see GPU_TIMEOUT_S)
ASSETS_S = {"cuda": 40.0, "cpu": 15.0}  # building and saving the two models, and the ceiling


@dataclasses.dataclass
class GpuPlan:
    shape: str
    device: str  # "cuda" or "cpu" (the dry run)
    precision: str  # both sides alike
    steps: dict
    batch: dict  # per stage; a stage not in it keeps its recipe's batch size
    max_samples: int
    run_timeout: dict  # seconds per run, per stage
    deadline: float  # seconds for the whole run
    use_vllm: bool  # PPO ours: vLLM rollouts
    vllm_note: str
    peer_ppo_problem: str | None  # why the trl 1.12 PPO peer cannot run (None: it can)

    def ours_set(self, stage: str) -> list[str]:
        if stage == "ppo" and self.use_vllm:
            # colocate: vLLM in the training process on the same GPU.  Its KV-cache pool is allocated through
            # torch, so it is part of the peak memory: a short context and a 10% share (14 GB of an H200,
            # plenty for 8 prompts x 32 new tokens of a 0.5B model) keep that part small
            return ["use_vllm=true", "vllm_mode=colocate", "vllm_max_model_length=1024",
                    "vllm_gpu_memory_utilization=0.1"]
        return []

    def peer_set(self) -> list[str]:
        # workloads.PEER_CPU_SETTINGS pins the peer to the CPU (use_cpu=True) for the CPU benchmarks;
        # on a GPU the peer must train where ours does
        return ["use_cpu=false"] if self.device == "cuda" else []

    def runs(self) -> list[tuple[str, str]]:
        return [(stage, side) for stage in STAGES for side in SIDES]

    def estimate_s(self) -> float:
        per_step = SECONDS_PER_STEP[self.device]
        runs = [(s, side) for s, side in self.runs() if not (s == "ppo" and side == "peer" and self.peer_ppo_problem)]
        after = AFTER_LOOP_S[self.device]
        return ASSETS_S[self.device] + sum(STARTUP_S[self.device] + self.steps[s] * per_step[s] + after.get(s, 0.0)
                                           for s, _ in runs)

    def describe(self) -> str:
        steps = ", ".join(f"{s} {n}" for s, n in self.steps.items())
        return (f"{self.shape} on {self.device}, {self.precision} both sides; steps {steps}; "
                f"PPO ours {'with vLLM rollouts (colocate)' if self.use_vllm else 'with transformers rollouts'}"
                f" ({self.vllm_note}); PPO peer: {self.peer_ppo_problem or 'trl 1.12.0 venv'}")


def vllm_state(device: str) -> tuple[bool, str]:
    """Whether our PPO can use vLLM here, and the sentence the table carries about it."""
    if device != "cuda":
        return False, "vLLM needs a CUDA GPU"
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (pip install vllm): PPO ours without vLLM"
    return True, "vllm importable"


def peer_ppo_problem() -> str | None:
    from benchmarks import peer_env

    if peer_env.is_ready():
        return None
    # building it means pip-installing trl 1.12.0, which needs the internet; the GPU machine has none
    return "the trl 1.12.0 venv is not built (python -m benchmarks peer-env, needs the internet): PPO ours alone"


def make_plan(dry_run_cpu: bool, cuda: bool, use_vllm: bool = False, vllm_note: str = "",
              peer_problem: str | None = None) -> GpuPlan:
    if dry_run_cpu:
        return GpuPlan("qwen2-dry", "cpu", "bf16", dict(DRY_STEPS), batch=dict(DRY_BATCH), max_samples=64,
                       run_timeout={stage: 300.0 for stage in STAGES},
                       deadline=1800.0, use_vllm=False, vllm_note="dry run on the CPU: no vLLM",
                       peer_ppo_problem=peer_problem)
    if not cuda:
        raise ValueError("no CUDA GPU: use --dry-run-cpu to run the same path on the CPU")
    return GpuPlan("qwen2-0.5b", "cuda", "bf16", dict(GPU_STEPS), batch={}, max_samples=2000,
                   run_timeout=dict(GPU_TIMEOUT_S),
                   deadline=DEADLINE_S, use_vllm=use_vllm, vllm_note=vllm_note, peer_ppo_problem=peer_problem)


def no_gpu_line() -> str:
    return ("no GPU: no CUDA device here, so benchmarks/gpu.sh runs nothing (exit 0). With one it would build a "
            "Qwen2-0.5B-shaped model from a config and time SFT, DPO, GRPO and PPO (vLLM rollouts) ours vs trl in "
            "bf16: tokens/s, peak GPU memory, MFU, in <= 10 minutes. "
            "`python -m benchmarks gpu --dry-run-cpu` runs the same path on the CPU.")


# ------------------------------------------------------------------------------------------ the model


def shape_config(shape: str, tokenizer):
    from transformers import Qwen2Config

    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    values = dict(SHAPES[shape])
    if values["vocab_size"] < len(tokenizer):
        raise ValueError(f"shape {shape}: vocabulary {values['vocab_size']} < the tokenizer's {len(tokenizer)}")
    return Qwen2Config(
        **values, tie_word_embeddings=True, use_sliding_window=False, max_window_layers=values["num_hidden_layers"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build_assets(shape: str, folder: str | Path, seed: int = SEED) -> dict:
    """Save a causal LM and a one-label classifier of `shape` (random, seeded, fp32) + the tiny tokenizer under
    `folder`, in the layout :mod:`benchmarks.workloads` reads (``policy``, ``reward``); return the description."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from benchmarks.measure import matmul_parameters
    from policies.tiny import load_tiny_tokenizer

    folder = Path(folder)
    tokenizer = load_tiny_tokenizer()
    models = {}
    for name, model_class in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        config = shape_config(shape, tokenizer)
        if name == "reward":
            config.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class.from_config(config)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.pad_token_id = tokenizer.pad_token_id
            generation.eos_token_id = tokenizer.eos_token_id
            generation.bos_token_id = tokenizer.bos_token_id
        model.save_pretrained(str(folder / name), safe_serialization=True)
        tokenizer.save_pretrained(str(folder / name))
        models[name] = model
    policy, reward = models["policy"], models["reward"]
    info = {
        "preset": shape, "seed": seed, "architecture": "qwen2",
        "parameters": sum(p.numel() for p in policy.parameters()),
        "matmul_parameters": matmul_parameters(policy),
        "reward_parameters": sum(p.numel() for p in reward.parameters()),
        "reward_matmul_parameters": matmul_parameters(reward),
        "vocab_size": len(tokenizer), "model_vocab_size": policy.config.vocab_size,
        "policy": str(folder / "policy"), "reward": str(folder / "reward"),
    }
    (folder / "assets.json").write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------------ one run (child)


def child(target: str, argv: list[str]) -> int:
    """Run :mod:`benchmarks.worker` or :mod:`benchmarks.ppo_peer` in this process and add the GPU's peak memory
    at the end of the training loop to the record it writes."""
    import torch

    from benchmarks import measure

    on_cuda = torch.cuda.is_available()
    peak = {}
    original_finish = measure.TrainMeter.finish

    def finish(self):
        if on_cuda:
            # CUDA is asynchronous: wait for the queued kernels so the loop's end time covers its work
            torch.cuda.synchronize()
            peak["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        original_finish(self)

    measure.TrainMeter.finish = finish
    if target == "worker":
        from benchmarks.worker import main
    else:
        from benchmarks.ppo_peer import main
    code = main(argv)
    result_path = Path(_arg(argv, "--result"))
    if result_path.is_file():
        record = json.loads(result_path.read_text())
        record.update({"cuda_peak_mb": peak.get("cuda_peak_mb"), "device": "cuda" if on_cuda else "cpu",
                       "gpu_name": torch.cuda.get_device_name(0) if on_cuda else None})
        result_path.write_text(json.dumps(record, indent=1, default=str))
    return code


def _arg(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# ------------------------------------------------------------------------------------------ the driver


def _command(plan: GpuPlan, stage: str, side: str, assets_json: Path, run_dir: Path, peer_python) -> list[str]:
    result = run_dir / "result.json"
    if stage == "ppo" and side == "peer":
        peer_set = dict(p.split("=", 1) for p in plan.peer_set())
        peer_set = {k: v.lower() == "true" if v.lower() in ("true", "false") else v for k, v in peer_set.items()}
        return [str(peer_python), "-m", "benchmarks.gpu", "child", "ppo_peer",
                "--assets-json", str(assets_json), "--steps", str(plan.steps[stage]), "--workdir", str(run_dir),
                "--result", str(result), "--peer-set", json.dumps(peer_set), "--precision", plan.precision]
    cmd = [sys.executable, "-m", "benchmarks.gpu", "child", "worker",
           "--stage", stage, "--side", side, "--assets-json", str(assets_json), "--steps", str(plan.steps[stage]),
           "--workdir", str(run_dir), "--result", str(result), "--precision", plan.precision,
           "--max-samples", str(plan.max_samples)]
    if stage in plan.batch:
        cmd += ["--batch", str(plan.batch[stage])]
    for item in plan.ours_set(stage):
        cmd += ["--ours-set", item]
    for item in plan.peer_set():
        cmd += ["--peer-set", item]
    return cmd


def _one(plan, stage, side, assets_json, workdir, peer_python, remaining: float) -> dict:
    from benchmarks.harness import run_child

    record = {"stage": stage, "side": side}
    if stage == "ppo" and side == "peer" and plan.peer_ppo_problem:
        return {**record, "status": "unavailable", "error": plan.peer_ppo_problem}
    if remaining < 30:
        return {**record, "status": "skipped", "error": f"the {plan.deadline:.0f} s budget is spent"}
    run_dir = workdir / "runs" / f"{stage}-{side}"
    log_path = workdir / "logs" / f"{stage}-{side}.log"
    timeout = min(plan.run_timeout[stage], remaining)
    code, wall = run_child(_command(plan, stage, side, assets_json, run_dir, peer_python), log_path, timeout)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        record.update(json.loads(result_path.read_text()))
    else:
        tail = log_path.read_text()[-3000:] if log_path.is_file() else ""
        reason = f"timed out after {timeout:.0f} s" if code == 124 else f"exit {code}, no result written"
        record.update({"status": "error", "error": f"{reason}; log tail:\n{tail}"})
    record.update({"exit_code": code, "process_seconds": round(wall, 1), "log": str(log_path)})
    return record


def _build_in_child(plan: GpuPlan, workdir: Path, log) -> Path:
    from benchmarks.harness import run_child

    folder = workdir / f"assets-{plan.shape}"
    log_path = workdir / "logs" / "assets.log"
    code, wall = run_child([sys.executable, "-m", "benchmarks.gpu", "build-assets", plan.shape, str(folder)],
                           log_path, 300)
    if code != 0:
        raise RuntimeError(f"building the {plan.shape} models failed; {log_path}:\n{log_path.read_text()[-2000:]}")
    info = json.loads((folder / "assets.json").read_text())
    log(f"[gpu] {plan.shape}: {info['parameters']:,} parameters ({info['matmul_parameters']:,} in matmuls, "
        f"vocabulary {info['model_vocab_size']:,}, tokenizer {info['vocab_size']}), built and saved in {wall:.0f} s")
    return folder / "assets.json"


def ceiling_key(plan: GpuPlan) -> str:
    return f"gpu_{plan.precision}" if plan.device == "cuda" else f"cpu_{plan.precision}"


def table_rows(runs: list[dict], device: str) -> list[dict]:
    """One row per run, and per stage the ratios ours/peer (tokens/s, peak memory) where both ran."""
    memory_key = "cuda_peak_mb" if device == "cuda" else "peak_rss_mb"
    rows = []
    for stage in dict.fromkeys(r["stage"] for r in runs):
        by_side = {r["side"]: r for r in runs if r["stage"] == stage}
        for side in SIDES:
            r = by_side.get(side, {"status": "not run"})
            rows.append({"stage": stage, "side": side, "status": r.get("status"),
                         "note": "" if r.get("status") == "ok" else str(r.get("error", "")).splitlines()[0][:160],
                         "tokens_per_s": r.get("tokens_per_s"), "memory_mb": r.get(memory_key), "mfu": r.get("mfu"),
                         "steps": r.get("steps"), "train_seconds": r.get("train_seconds")})
        ours, peer = by_side.get("ours", {}), by_side.get("peer", {})
        if ours.get("status") == "ok" and peer.get("status") == "ok":
            rows.append({"stage": stage, "side": "ours/peer", "status": "ratio", "note": "",
                         "tokens_per_s": _ratio(ours, peer, "tokens_per_s"),
                         "memory_mb": _ratio(ours, peer, memory_key), "mfu": None,
                         "steps": None, "train_seconds": None})
    return rows


def _ratio(ours: dict, peer: dict, key: str) -> float | None:
    return ours[key] / peer[key] if ours.get(key) and peer.get(key) else None


def _fmt(value, ratio: bool = False) -> str:
    if value is None:
        return "-"
    if ratio:
        return f"**{value:.2f}x**"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown_table(rows: list[dict], device: str) -> str:
    memory = "peak GPU MiB (max_memory_allocated)" if device == "cuda" else "peak RSS MiB (dry run: CPU)"
    lines = [f"| stage | side | train tokens/s | {memory} | MFU | steps | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        is_ratio = row["side"] == "ours/peer"
        if row["status"] not in ("ok", "ratio"):
            lines.append(f"| {row['stage']} | {row['side']} | - | - | - | - | {row['status']}: {row['note']} |")
            continue
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.2f}%"
        lines.append(f"| {row['stage']} | {row['side']} | {_fmt(row['tokens_per_s'], is_ratio)} | "
                     f"{_fmt(row['memory_mb'], is_ratio)} | {mfu} | {row['steps'] or ''} | |")
    return "\n".join(lines)


def run(plan: GpuPlan, output: str | Path, log=print) -> dict:
    from benchmarks.harness import add_mfu, machine_info, measure_ceiling

    started = time.monotonic()
    stamp = datetime.datetime.now(datetime.timezone.utc)
    estimate = plan.estimate_s()
    log(f"[gpu] plan: {plan.describe()}")
    log(f"[gpu] estimated {estimate:.0f} s (a guess: not measured on a GPU yet); budget {plan.deadline:.0f} s, "
        f"per run {', '.join(f'{s} {t:.0f} s' for s, t in plan.run_timeout.items())}")
    peer_python = None
    if not plan.peer_ppo_problem:
        from benchmarks import peer_env

        peer_python = peer_env.peer_python()
    workdir = Path(tempfile.mkdtemp(prefix="align-gpu-bench-"))
    assets_json = _build_in_child(plan, workdir, log)
    ceiling = measure_ceiling(workdir, 3, log)
    key = ceiling_key(plan)
    if key not in ceiling:
        raise RuntimeError(f"the ceiling measurement has no {key} (a CUDA device went missing?): {sorted(ceiling)}")
    ceiling_gflops = ceiling[key]["best_gflops"]
    log(f"[gpu] {key} ceiling {ceiling_gflops:,.0f} GFLOP/s")
    runs = []
    for stage, side in plan.runs():
        remaining = plan.deadline - (time.monotonic() - started)
        record = _one(plan, stage, side, assets_json, workdir, peer_python, remaining)
        runs.append(record)
        shown = record.get("tokens_per_s")
        log(f"[gpu] {stage:<4} {side:<4} {record.get('status')}: "
            + (f"{shown:,.0f} tokens/s in {record.get('train_seconds', 0):.1f} s, "
               f"{record.get('process_seconds')} s in all" if record.get("status") == "ok" and shown else
               str(record.get("error", "")).splitlines()[0][:200] if record.get("error") else ""))
    add_mfu(runs, ceiling_gflops)
    rows = table_rows(runs, plan.device)
    table = markdown_table(rows, plan.device)
    elapsed = time.monotonic() - started
    report = {
        "started": stamp.isoformat(timespec="seconds"), "seconds": round(elapsed, 1),
        "plan": dataclasses.asdict(plan), "estimate_s": estimate, "machine": machine_info(),
        "gpu_name": ceiling.get("gpu_name"), "ceiling_key": key, "ceiling_gflops": ceiling_gflops, "ceiling": ceiling,
        "mfu_formula": f"MFU = 6 x matmul_params x train_tokens_per_s x computed share / {key} ceiling",
        "assets": json.loads(assets_json.read_text()), "rows": rows, "runs": runs,
        "verified_on_gpu": False,  # flip by hand once a GPU run has been read and checked
    }
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu-{'dry-cpu-' if plan.device == 'cpu' else ''}{stamp.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    header = (f"# GPU benchmark {report['started']}: {plan.describe()}\n\n"
              f"- device: {ceiling.get('gpu_name') or 'CPU (dry run)'}; {key} ceiling {ceiling_gflops:,.0f} GFLOP/s; "
              f"{report['mfu_formula']}\n- one run per side, {elapsed:.0f} s in all\n\n")
    (out / f"{name}.md").write_text(header + table + "\n")
    log("")
    log(table)
    log(f"\n[gpu] {elapsed:.0f} s; wrote {out / name}.json and .md")
    report["table"] = table
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="the same path on the CPU: a tiny Qwen2 shape, 1-2 steps per stage")
    parser.add_argument("--output", default="benchmarks/results/", help="folder for gpu-<time>.{json,md}")


def main_from_args(dry_run_cpu: bool, output: str) -> int:
    """`python -m benchmarks gpu`: the exit code is 0 when every run that could run ran (or there is no GPU)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not dry_run_cpu:
        print(no_gpu_line())
        return 0
    device = "cuda" if cuda and not dry_run_cpu else "cpu"
    use_vllm, note = vllm_state(device)
    plan = make_plan(dry_run_cpu, cuda, use_vllm, note, peer_ppo_problem())
    report = run(plan, output)
    failed = [r for r in report["runs"] if r.get("status") in ("error", "pending")]
    return 1 if failed else 0


if __name__ == "__main__":
    # children of the driver: `build-assets SHAPE FOLDER` and `child worker|ppo_peer <args>` (the precision is in <args>)
    if sys.argv[1:2] == ["build-assets"]:
        print(json.dumps(build_assets(sys.argv[2], sys.argv[3])))
        raise SystemExit(0)
    if sys.argv[1:2] == ["child"]:
        raise SystemExit(child(sys.argv[2], sys.argv[3:]))
    raise SystemExit("python -m benchmarks.gpu is the driver's child; run `python -m benchmarks gpu` instead")
