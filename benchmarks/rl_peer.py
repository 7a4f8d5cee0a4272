"""Our RL loop's GRPO and RLOO (alignment.ppo) against trl's GRPOTrainer / RLOOTrainer at equal settings.

    python -m benchmarks rl-peer [--algo grpo,rloo] [--preset 20m] [--repeats 3] [--steps 4]
                                 [--completion-length 16] [--model DIR] [--seed 42] [--output benchmarks/results/]

Both sides start from the same saved weights (:mod:`benchmarks.assets`, or ``--model DIR``: e.g. an SFT
checkpoint, so that the reward can move), read the same prompts (``data/tiny_arith/rl_prompts.jsonl``,
rendered with the tokenizer's chat template), score with the same function (:func:`benchmarks.workloads.
answer_reward`, the first integer against the answer), and run the same algorithm with the same settings:

* ``--prompts`` prompts x ``--generations`` completions per step, one optimizer update per step (trl:
  ``per_device_train_batch_size`` = the step's completions, ``num_iterations=1``; ours: ``batch_size`` =
  ``mini_batch_size`` = the step's completions, ``ppo_epochs=1``);
* ``--completion-length`` new tokens at most, pure sampling at temperature 1 (top-k / top-p off), fp32;
* GRPO: group-standardised advantages, a per-sequence token mean (trl ``loss_type="grpo"``; ours
  ``advantage_estimator: grpo``), a k3 KL to the reference in the loss with ``beta`` (trl's GRPO formula;
  ours ``kl_in: loss``, ``kl_estimator: k3``);
* RLOO: leave-one-out baselines, the KL to the reference in the reward with ``beta`` (trl's RLOO; ours
  ``kl_in: reward``, k1);
* learning rate, linear decay to 0 over the run, gradient-norm clip 1.0 on both.

Ours runs with its defaults ``share_prompt`` / ``share_prefill`` (each group's prompt computed once in the
log-prob passes, the update and generate's prefill: the same computation up to float rounding, docs/ppo.md);
trl computes the prompt once per completion. Both skip the old log-prob pass at one update per rollout.

Each run is a fresh process, alternating ours, peer, ours, peer, ...; a run's record holds the training
loop's seconds (``train()`` wall time: generation, scoring and updates), completions per second, the
process's peak resident memory and the mean reward of the last steps.  Prints a table and writes
``<output>/rl-peer-<time>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny_arith" / "rl_prompts.jsonl"
ALGOS = ("grpo", "rloo")


def _rows(tokenizer, limit: int) -> list[dict]:
    """Conversational prompts rendered as trl renders them (chat template, generation prompt) + the answer."""
    rows = []
    with open(DATA, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": text, "answer": row["answer"]})
            if len(rows) >= limit:
                break
    return rows


def run_ours(algo: str, model_dir: str, settings: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from alignment.ppo import PPOConfig, PPOTrainer
    from benchmarks.workloads import answer_reward

    set_seed(settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    completions = settings["prompts"] * settings["generations"]
    kl = {"kl_in": "loss", "kl_estimator": "k3"} if algo == "grpo" else {"kl_in": "reward", "kl_estimator": "k1"}
    config = PPOConfig(
        advantage_estimator=algo, num_generations=settings["generations"], batch_size=completions,
        mini_batch_size=completions, ppo_epochs=1, total_steps=settings["steps"],
        max_new_tokens=settings["completion_length"], temperature=1.0, learning_rate=settings["learning_rate"],
        lr_scheduler_type="linear", kl_coef=settings["beta"], max_grad_norm=1.0, seed=settings["seed"],
        logging_steps=max(1, settings["steps"]), max_kl=None, min_entropy=None, min_eos_rate=None,
        pack_updates=settings["pack"], **kl,
    )
    trainer = PPOTrainer(config, policy, ref, None, tokenizer, answer_reward, _rows(tokenizer, settings["max_prompts"]))
    started = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - started
    rewards = [h["objective/score"] for h in history]
    return _record(seconds, completions * len(history), rewards, settings,
                   {"time_split": {k: round(sum(h[k] for h in history), 2)
                                   for k in ("time/generation", "time/scoring", "time/training")}})


def run_peer(algo: str, model_dir: str, settings: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

    from benchmarks.workloads import PEER_CPU_SETTINGS, answer_reward

    set_seed(settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = []
    with open(DATA, encoding="utf-8") as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) >= settings["max_prompts"]:
                break
    dataset = Dataset.from_list(rows)
    completions = settings["prompts"] * settings["generations"]
    args = dict(
        PEER_CPU_SETTINGS, output_dir=tempfile.mkdtemp(prefix="rl-peer-"), save_strategy="no",
        per_device_train_batch_size=completions, num_generations=settings["generations"], num_iterations=1,
        max_completion_length=settings["completion_length"], temperature=1.0, top_k=0, top_p=1.0,
        learning_rate=settings["learning_rate"], lr_scheduler_type="linear", beta=settings["beta"],
        max_grad_norm=1.0, max_steps=settings["steps"], logging_steps=1, seed=settings["seed"],
    )
    if algo == "grpo":
        args["loss_type"] = "grpo"
    config_class, trainer_class = (trl.GRPOConfig, trl.GRPOTrainer) if algo == "grpo" else (trl.RLOOConfig,
                                                                                          trl.RLOOTrainer)
    logged = []

    class Rewards(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                logged.append(float(logs["reward"]))

    trainer = trainer_class(model=model, args=config_class(**args), train_dataset=dataset,
                            processing_class=tokenizer, reward_funcs=answer_reward, callbacks=[Rewards()])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return _record(seconds, completions * trainer.state.global_step, logged, settings, {"peer_args": {
        k: v for k, v in args.items() if k != "output_dir"}})


def _record(seconds: float, completions: int, rewards: list, settings: dict, extra: dict) -> dict:
    from benchmarks.measure import environment, peak_rss_mb

    window = rewards[-max(1, len(rewards) // 2):]  # the last half of the steps: one batch is noisy
    return {
        "train_seconds": round(seconds, 3),
        "completions": completions,
        "samples_per_s": completions / seconds if seconds else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "reward_per_step": rewards,
        "final_reward": statistics.fmean(window) if window else None,
        "settings": settings,
        "environment": environment(),
        **extra,
    }


# ---------------------------------------------------------------------------------------------- driver


def _child(side: str, algo: str, model_dir: str, settings: dict, result: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    record = (run_ours if side == "ours" else run_peer)(algo, model_dir, settings)
    result.write_text(json.dumps(record, indent=1, default=str))


def _spawn(side, algo, model_dir, settings, workdir: Path, timeout: float) -> dict:
    result = workdir / f"{algo}-{side}-{time.time_ns()}.json"
    command = [sys.executable, "-m", "benchmarks.rl_peer", "--child", side, "--algo", algo, "--model", model_dir,
               "--settings-json", json.dumps(settings), "--result", str(result)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode or not result.is_file():
        return {"status": "error", "error": done.stderr[-3000:], "wall_s": time.perf_counter() - started}
    return {"status": "ok", **json.loads(result.read_text())}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for algo in dict.fromkeys(r["algo"] for r in runs):
        sides = {side: [r for r in runs if r["algo"] == algo and r["side"] == side and r["status"] == "ok"]
                 for side in ("ours", "peer")}
        row = {"algo": algo}
        for side, records in sides.items():
            row[side] = {
                "runs": len(records),
                "samples_per_s": [round(r["samples_per_s"], 2) for r in records],
                "samples_per_s_median": _median([r["samples_per_s"] for r in records]),
                "peak_rss_mb": [r["peak_rss_mb"] for r in records],
                "peak_rss_mb_median": _median([r["peak_rss_mb"] for r in records]),
                "final_reward": [r["final_reward"] for r in records],
                "final_reward_median": _median([r["final_reward"] for r in records]),
            }
        ours, peer = row["ours"]["samples_per_s_median"], row["peer"]["samples_per_s_median"]
        row["speedup"] = ours / peer if ours and peer else None
        mem_o, mem_p = row["ours"]["peak_rss_mb_median"], row["peer"]["peak_rss_mb_median"]
        row["memory_ratio"] = mem_o / mem_p if mem_o and mem_p else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| algorithm | side | runs | completions/s (each) | median | peak RSS MiB (median) | "
             "final reward (each) | speedup ours/peer | memory ours/peer |", "| --- | --- | --- | --- | --- | --- | "
             "--- | --- | --- |"]
    for row in rows:
        for side in ("ours", "peer"):
            s = row[side]
            fmt = (lambda v: "-" if v is None else f"{v:.3g}")  # noqa: E731
            lines.append(f"| {row['algo']} | {side} | {s['runs']} | {', '.join(f'{v:.2f}' for v in s['samples_per_s'])} "
                         f"| {fmt(s['samples_per_s_median'])} | {fmt(s['peak_rss_mb_median'])} | "
                         f"{', '.join(fmt(v) for v in s['final_reward'])} | "
                         f"{fmt(row['speedup']) if side == 'ours' else ''} | "
                         f"{fmt(row['memory_ratio']) if side == 'ours' else ''} |")
    return "\n".join(lines) + "\n"


def run_benchmark(algos, preset: str, repeats: int, settings: dict, model: str | None, output: str,
                  timeout: float) -> dict:
    from benchmarks import assets
    from benchmarks.harness import machine_info

    workdir = Path(tempfile.mkdtemp(prefix="rl-peer-"))
    model_dir = model or assets.build(preset, workdir / "assets")["policy"]
    runs = []
    for algo in algos:
        for repeat in range(repeats):
            for side in ("ours", "peer"):
                record = _spawn(side, algo, model_dir, settings, workdir, timeout)
                record.update({"algo": algo, "side": side, "repeat": repeat})
                runs.append(record)
                shown = record.get("samples_per_s")
                print(f"{algo} {side} #{repeat}: {record['status']} "
                      f"{'' if shown is None else f'{shown:.2f} completions/s'} "
                      f"peak {record.get('peak_rss_mb')} MiB reward {record.get('final_reward')}", flush=True)
    rows = summary_rows(runs)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    header = (f"# Our loop vs trl: {', '.join(algos)} on {model or preset}, {repeats} (ours, peer) pairs, "
              f"{settings['steps']} steps of {settings['prompts']} prompts x {settings['generations']} completions, "
              f"<= {settings['completion_length']} new tokens, fp32 ({stamp})")
    report = {"command": " ".join(sys.argv), "machine": machine_info(), "settings": settings, "model": model_dir,
              "preset": None if model else preset, "rows": rows, "runs": runs}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rl-peer-{stamp}.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(rows, header)
    (out / f"rl-peer-{stamp}.md").write_text(table)
    print(table)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", type=lambda t: [a for a in t.split(",") if a], default=list(ALGOS))
    parser.add_argument("--preset", default="20m", help="1m | 20m (benchmarks.assets, random init)")
    parser.add_argument("--model", default=None, help="start both sides from this model directory instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (the group)")
    parser.add_argument("--completion-length", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--pack", action="store_true", help="ours: train.pack_updates")
    parser.add_argument("--max-prompts", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42, help="both sides: weights' sampling, data order, sampling")
    parser.add_argument("--output", default="benchmarks/results/")
    parser.add_argument("--timeout", type=float, default=1800.0)


def settings_from(args) -> dict:
    return {"steps": args.steps, "prompts": args.prompts, "generations": args.generations,
            "completion_length": args.completion_length, "learning_rate": args.learning_rate, "beta": args.beta,
            "pack": args.pack, "max_prompts": args.max_prompts, "seed": args.seed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rl_peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--child", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--settings-json", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.algo[0], args.model, json.loads(args.settings_json), Path(args.result))
        return 0
    bad = [a for a in args.algo if a not in ALGOS]
    if bad:
        parser.error(f"unknown --algo {bad}; valid: {', '.join(ALGOS)}")
    run_benchmark(args.algo, args.preset, args.repeats, settings_from(args), args.model, args.output, args.timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
