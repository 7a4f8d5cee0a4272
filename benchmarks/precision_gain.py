"""What `precision: auto` chooses on this machine, and the speed it buys over fp32.

    python -m benchmarks precision-gain [--recipe recipes/tiny/sft.yaml] [--model tiny:20m]
                                        [--pairs 3] [--steps 40] [--isa default|avx2] [--target 2.0]

runs ``align run RECIPE model.name_or_path=MODEL train.max_steps=STEPS precision=auto`` and the same run
with ``precision=fp32``, alternating (auto, fp32, auto, fp32, ...: a drift of the machine's load falls on
both), each in a fresh process and a fresh output folder, with nothing outside the training loop (no
evaluation, no checkpoint).  From each run it reads what was chosen and why (``run_info.json``
``precision``) and the trainer's own ``train_samples_per_second`` and final loss (``metrics.jsonl``), then
prints one table with the ratio auto / fp32 per pair and as min / median / max, both for the whole run and
for its steady part (from the first logged step, 10, to the last: the first steps build bf16 kernels), and writes
``<output>/precision-gain-<time>.{json,md}``.

This is the check of issue 18's first line on any machine: on a CPU with bf16 units auto should choose bf16
and train faster than fp32 (``--target``, the ratio the median must reach, is reported as met or not); with
``--isa avx2`` (oneDNN capped below its bf16 kernels: another CPU's path on the same machine) it should
choose fp32, and the ratio is then ~1.  The exit status is 0 when every run finished, whatever the ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# logging every 10 steps gives the steady rate (after the first 10 steps: bf16 kernels are built on first use)
RUN_OVERRIDES = ("eval=null", "options.evaluate_before=false", "train.save_strategy='no'", "data.max_samples=4000",
                 "train.logging_steps=10")


def run_once(recipe: str, model: str, precision: str, steps: int, output_dir: Path, env: dict,
             extra: tuple = ()) -> dict:
    """One `align run` in a fresh process; what it chose, its samples/s and final loss."""
    command = [sys.executable, "-m", "alignment.cli", "run", recipe, f"model.name_or_path={model}",
               f"train.max_steps={steps}", f"precision={precision}", f"output_dir={output_dir}",
               *RUN_OVERRIDES, *extra]
    started = time.perf_counter()
    finished = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        tail = (finished.stdout + finished.stderr)[-2000:]
        return {"requested": precision, "status": f"exit {finished.returncode}", "seconds": round(seconds, 1),
                "log_tail": tail}
    return {"requested": precision, "status": "ok", "seconds": round(seconds, 1), **read_run(output_dir)}


def read_run(output_dir: Path) -> dict:
    """The precision record of `run_info.json`, the trainer's summary line of `metrics.jsonl` and the steady
    samples/s between its first and last logged training steps (None with fewer than two)."""
    info = json.loads((output_dir / "run_info.json").read_text())
    summary, logged = {}, []
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train_samples_per_second" in row:
            summary = row
        elif "loss" in row:
            logged.append((row["step"], row["time"]))
    if not summary:
        raise ValueError(f"{output_dir / 'metrics.jsonl'}: no line with train_samples_per_second")
    steady = None
    if len(logged) >= 2 and logged[-1][1] > logged[0][1]:
        # the trainer's rate is steps x samples per step / runtime: samples per step from it
        per_step = summary["train_samples_per_second"] * summary["train_runtime"] / summary["step"]
        steady = (logged[-1][0] - logged[0][0]) * per_step / (logged[-1][1] - logged[0][1])
    precision = info["precision"]
    return {"chosen": precision["chosen"], "reason": precision["reason"], "parameters": precision.get("parameters"),
            "samples_per_s": summary["train_samples_per_second"], "steady_samples_per_s": steady,
            "train_loss": summary.get("train_loss"), "train_runtime_s": summary.get("train_runtime")}


def pair_ratios(pairs: list[dict], key: str = "samples_per_s") -> list[float]:
    """auto / fp32 of `key` for each pair whose two runs finished and have it."""
    return [p["auto"][key] / p["fp32"][key] for p in pairs if p["auto"]["status"] == "ok"
            and p["fp32"]["status"] == "ok" and p["auto"].get(key) and p["fp32"].get(key)]


def spread(values: list[float]) -> dict:
    """The harness's min / median / max (benchmarks.harness.spread), to 4 decimals."""
    from benchmarks.harness import spread as harness_spread

    stats = harness_spread(values)
    return {key: round(stats[key], 4) for key in ("min", "median", "max")}


def summarise(pairs: list[dict], target: float | None) -> dict:
    """Per pair auto / fp32 samples/s, whole run and steady; min / median / max of each; whether the median
    reaches `target` (only where auto chose a half precision: choosing fp32 promises no gain)."""
    ratios, steady = pair_ratios(pairs), pair_ratios(pairs, "steady_samples_per_s")
    chosen = sorted({p["auto"].get("chosen") for p in pairs if p["auto"]["status"] == "ok"})
    summary = {"auto_chose": chosen, "ratios": [round(r, 4) for r in ratios],
               "steady_ratios": [round(r, 4) for r in steady]}
    if ratios:
        summary["ratio"] = spread(ratios)
    if steady:
        summary["steady_ratio"] = spread(steady)
    if ratios and target is not None and chosen != ["fp32"]:  # a target for half precision's speed, when chosen
        summary["target"] = target
        summary["target_met"] = summary["ratio"]["median"] >= target
        if steady:
            summary["steady_target_met"] = summary["steady_ratio"]["median"] >= target
    return summary


def markdown(report: dict) -> str:
    lines = [f"# precision: auto against fp32, {report['time']}", "",
             f"- command: `{report['command']}`",
             f"- CPU: {report['cpu']['cpu']}; flags {', '.join(report['cpu']['cpu_flags']) or 'none of note'}; torch "
             f"kernel path {report['cpu']['aten_capability']}"
             f"{' (forced: ' + ', '.join(f'{k}={v}' for k, v in report['cpu']['forced'].items()) + ')' if report['cpu']['forced'] else ''}"
             f"; {report['cpu']['threads']} threads; load average at start {report['load_start']}, at end {report['load_end']}",
             f"- commit {report['commit']}", "",
             "| pair | auto chose | auto samples/s | fp32 samples/s | auto / fp32 | steady auto / fp32 samples/s "
             "| steady auto / fp32 | loss auto / fp32 |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for i, pair in enumerate(report["pairs"]):
        auto, fp32 = pair["auto"], pair["fp32"]
        if auto["status"] != "ok" or fp32["status"] != "ok":
            lines.append(f"| {i} | {auto['status']} | | | | | | fp32: {fp32['status']} |")
            continue
        steady = "- | -"
        if auto.get("steady_samples_per_s") and fp32.get("steady_samples_per_s"):
            steady = (f"{auto['steady_samples_per_s']:.2f} / {fp32['steady_samples_per_s']:.2f} | "
                      f"{auto['steady_samples_per_s'] / fp32['steady_samples_per_s']:.2f}x")
        lines.append(f"| {i} | {auto['chosen']} | {auto['samples_per_s']:.2f} | {fp32['samples_per_s']:.2f} | "
                     f"{auto['samples_per_s'] / fp32['samples_per_s']:.2f}x | {steady} | "
                     f"{auto['train_loss']:.4f} / {fp32['train_loss']:.4f} |")
    summary = report["summary"]
    if "ratio" in summary:
        r = summary["ratio"]
        lines += ["", f"auto chose {', '.join(summary['auto_chose'])} "
                  f"({report['pairs'][0]['auto'].get('reason', '')}); auto / fp32 samples/s min / median / max: "
                  f"**{r['min']:.2f}x / {r['median']:.2f}x / {r['max']:.2f}x**"
                  + (f", steady **{summary['steady_ratio']['min']:.2f}x / {summary['steady_ratio']['median']:.2f}x / "
                     f"{summary['steady_ratio']['max']:.2f}x**" if "steady_ratio" in summary else "")
                  + (f"; target {summary['target']}x (median) {'met' if summary['target_met'] else 'not met'}"
                     + (f", steady {'met' if summary['steady_target_met'] else 'not met'}"
                        if "steady_target_met" in summary else "")
                     if "target" in summary else "")]
    return "\n".join(lines) + "\n"


def run_gain(recipe: str, model: str, pairs: int, steps: int, isa: str, output: str, target: float | None,
             extra: tuple = (), log=print) -> dict:
    from benchmarks.efficacy import ISA_ENVIRONMENTS, git_commit, kernel_path

    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **ISA_ENVIRONMENTS[isa]}
    cpu = kernel_path(env, ISA_ENVIRONMENTS[isa])
    command = (f"python -m benchmarks precision-gain --recipe {recipe} --model {model} --pairs {pairs} "
               f"--steps {steps} --isa {isa}" + "".join(f" --set {e}" for e in extra))
    log(f"[precision-gain] {recipe} with {model}, {steps} steps, {pairs} pairs (auto, fp32 alternating); CPU "
        f"{cpu['cpu']}, flags {cpu['cpu_flags']}, kernel path {cpu['aten_capability']}")
    load_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory(prefix="precision-gain-") as work:
        for i in range(pairs):
            pair = {}
            for precision in ("auto", "fp32"):
                pair[precision] = run_once(recipe, model, precision, steps, Path(work) / f"{precision}-{i}", env, extra)
                got = pair[precision]
                log(f"  pair {i} {precision}: {got['status']}"
                    + (f", chose {got['chosen']}, {got['samples_per_s']:.2f} samples/s, loss {got['train_loss']:.4f}"
                       if got["status"] == "ok" else f"\n{got['log_tail']}"))
            results.append(pair)
    report = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command, "recipe": recipe, "model": model,
              "steps": steps, "isa": isa, "cpu": cpu, "commit": git_commit(), "load_start": load_start,
              "load_end": [round(x, 2) for x in os.getloadavg()], "pairs": results,
              "summary": summarise(results, target)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"precision-gain-{time.strftime('%Y%m%d-%H%M%S')}-{isa}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    log(table)
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--recipe", default="recipes/tiny/sft.yaml")
    parser.add_argument("--model", default="tiny:20m")
    parser.add_argument("--pairs", type=int, default=3, help="(auto, fp32) pairs, alternating")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--isa", choices=["default", "avx2"], default="default",
                        help="avx2: torch, oneDNN and MKL capped at AVX2 (auto should then choose fp32)")
    parser.add_argument("--target", type=float, default=2.0, help="the median auto / fp32 ratio to report as met")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for both runs, repeatable")
    parser.add_argument("--output", default="benchmarks/results/")


def main_from_args(args) -> int:
    report = run_gain(args.recipe, args.model, args.pairs, args.steps, args.isa, args.output, args.target,
                      tuple(args.set))
    return 0 if all(p[k]["status"] == "ok" for p in report["pairs"] for k in ("auto", "fp32")) else 1
