"""The harness: every stage against its peer, alternating, each run in a fresh process.

For each preset: save the tiny models once (:mod:`benchmarks.assets`); for each
stage: ``repeats`` x (ours, peer) runs in that order, each a subprocess
(:mod:`benchmarks.worker`, or :mod:`benchmarks.ppo_peer` in the peer's own
venv for PPO); then medians, min-max spreads and paired ratios ours/peer
(run i of ours against run i of the peer, started right after it, so slow
drifts of a shared machine's load cancel).  The matmul ceiling is measured
before and after the runs, in a fresh process too; the higher value is the
MFU denominator.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.workloads import STAGES

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("1m", "20m")
SIDES = ("ours", "peer")

# Training steps per run when --steps is not given: about 5-20 s of training loop per run on a
# quiet 2-core machine, 5x that under a load average of ~11 (measured with this harness).
DEFAULT_STEPS = {
    "sft": {"1m": 60, "20m": 10},
    "reward_model": {"1m": 60, "20m": 10},
    "dpo": {"1m": 40, "20m": 8},
    "grpo": {"1m": 12, "20m": 4},
    "rloo": {"1m": 24, "20m": 4},
    "ppo": {"1m": 8, "20m": 3},
}

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

METRICS = ("tokens_per_s", "samples_per_s", "peak_rss_mb", "metric", "mfu")


@dataclass
class Plan:
    stages: list
    presets: list
    repeats: int = 3
    steps: int | None = None
    batch: int | None = None
    max_samples: int | None = 2000  # first N rows of each training file, both sides (tokenising all is untimed but slow)
    output: str = str(ROOT / "benchmarks" / "results")
    ours_set: list = field(default_factory=list)
    peer_set: list = field(default_factory=list)
    timeout: float = 1800.0
    ceiling_trials: int = 10
    keep_workdir: bool = False
    label: str = ""
    child_env: dict = field(default_factory=dict)  # extra environment for every child (both sides, ceiling)
    precision: str = "fp32"  # both sides alike: our `precision=`, the peer's bf16 flag (like for like)

    def steps_for(self, stage: str, preset: str) -> int:
        return self.steps or DEFAULT_STEPS[stage].get(preset, DEFAULT_STEPS[stage]["1m"])


# ------------------------------------------------------------------------------------------ children


_EXTRA_ENV: dict = {}


def child_env() -> dict:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env.update(_EXTRA_ENV)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, float]:
    """Run a child process (output to `log_path`); return (exit code, wall seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def measure_ceiling(workdir: Path, trials: int, log) -> dict:
    log_path = workdir / "logs" / f"ceiling-{time.time_ns()}.log"
    cmd = [sys.executable, "-m", "benchmarks.ceiling", "--trials", str(trials)]
    code, _ = run_child(cmd, log_path, 600)
    text = log_path.read_text().strip().splitlines()
    if code != 0 or not text:
        raise RuntimeError(f"ceiling measurement failed (exit {code}); see {log_path}")
    result = json.loads(text[-1])
    log(f"[ceiling] fp32 matmul: {result['cpu_fp32']['best_gflops']} GFLOP/s "
        f"(trials {result['cpu_fp32']['trials_gflops']}, {result['cpu_fp32']['threads']} threads); "
        f"bf16: {result.get('cpu_bf16', {}).get('best_gflops')} GFLOP/s")
    return result


def prepare_assets(preset: str, workdir: Path, log) -> Path:
    folder = workdir / f"assets-{preset}"
    code = f"import json; from benchmarks.assets import build; print(json.dumps(build({preset!r}, {str(folder)!r})))"
    log_path = workdir / "logs" / f"assets-{preset}.log"
    rc, _ = run_child([sys.executable, "-c", code], log_path, 600)
    if rc != 0:
        raise RuntimeError(f"saving the {preset} models failed; see {log_path}:\n{log_path.read_text()[-2000:]}")
    info = json.loads(log_path.read_text().strip().splitlines()[-1])
    path = folder / "assets.json"
    path.write_text(json.dumps(info))
    log(f"[assets] {preset}: {info['parameters']:,} parameters ({info['matmul_parameters']:,} in matmuls), "
        f"saved to {folder}")
    return path


def one_run(plan: Plan, stage: str, preset: str, side: str, repeat: int, assets_json: Path, workdir: Path,
            peer_python: Path | None) -> dict:
    steps = plan.steps_for(stage, preset)
    name = f"{stage}-{preset}-{side}-{repeat}"
    run_dir = workdir / "runs" / name
    result_path = run_dir / "result.json"
    log_path = workdir / "logs" / f"{name}.log"
    if stage == "ppo" and side == "peer":
        peer_set = {}
        for item in plan.peer_set:
            import yaml

            key, _, text = item.partition("=")
            peer_set[key] = yaml.safe_load(text)
        cmd = [str(peer_python), "-m", "benchmarks.ppo_peer", "--assets-json", str(assets_json),
               "--steps", str(steps), "--workdir", str(run_dir), "--result", str(result_path),
               "--peer-set", json.dumps(peer_set), "--precision", plan.precision]
    else:
        cmd = [sys.executable, "-m", "benchmarks.worker", "--stage", stage, "--side", side,
               "--assets-json", str(assets_json), "--steps", str(steps), "--workdir", str(run_dir),
               "--result", str(result_path), "--precision", plan.precision]
        if plan.batch:
            cmd += ["--batch", str(plan.batch)]
        if plan.max_samples:
            cmd += ["--max-samples", str(plan.max_samples)]
        for item in plan.ours_set:
            cmd += ["--ours-set", item]
        for item in plan.peer_set:
            cmd += ["--peer-set", item]
    code, wall = run_child(cmd, log_path, plan.timeout)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text()[-3000:] if log_path.is_file() else ""
        reason = "timed out" if code == 124 else f"exit {code}, no result written"
        result = {"status": "error", "error": f"{reason}; log tail:\n{tail}"}
    result.update({"stage": stage, "preset": preset, "side": side, "repeat": repeat, "exit_code": code,
                   "process_seconds": round(wall, 2), "log": str(log_path)})
    if not plan.keep_workdir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------ statistics


def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def add_mfu(runs: list[dict], ceiling_gflops: float) -> None:
    """MFU = 6 x matmul parameters x train tokens/s / measured fp32 matmul FLOP/s."""
    for run in runs:
        if run.get("status") == "ok" and run.get("tokens_per_s") and run.get("matmul_params"):
            computed = run["tokens_per_s"] * run.get("computed_token_share", 1.0)  # shared prompts: fewer
            run["mfu"] = 6 * run["matmul_params"] * computed / (ceiling_gflops * 1e9)
        else:
            run["mfu"] = None


def summarise_runs(runs: list[dict]) -> list[dict]:
    """One row per (stage, preset): each side's spread per metric, and paired ratios ours/peer."""
    rows = []
    keys = []
    for run in runs:
        key = (run["stage"], run["preset"])
        if key not in keys:
            keys.append(key)
    for stage, preset in keys:
        row = {"stage": stage, "preset": preset, "sides": {}, "ratio": {}, "status": {}, "errors": {}}
        by_side = {side: [r for r in runs if r["stage"] == stage and r["preset"] == preset and r["side"] == side]
                   for side in SIDES}
        for side, side_runs in by_side.items():
            ok = [r for r in side_runs if r.get("status") == "ok"]
            row["status"][side] = "ok" if ok else (side_runs[0].get("status", "error") if side_runs else "not run")
            errors = sorted({r.get("error", "") for r in side_runs if r.get("status") != "ok"})
            if errors:
                row["errors"][side] = errors
            row["sides"][side] = {m: spread([r.get(m) for r in ok]) for m in METRICS}
            names = {r.get("metric_name") for r in ok if r.get("metric_name")}
            row["sides"][side]["metric_name"] = ", ".join(sorted(names)) or None
            row["sides"][side]["steps"] = ok[0].get("steps") if ok else None
            # DPO: held-out preference accuracy of the trained policy (workloads.heldout_preference)
            held = [r["heldout"]["preference_accuracy"] for r in ok if r.get("heldout")]
            row["sides"][side]["heldout_accuracy"] = spread(held) if held else None
        pairs = {}
        for ours in by_side["ours"]:
            peer = next((p for p in by_side["peer"] if p["repeat"] == ours["repeat"]), None)
            if peer and ours.get("status") == "ok" and peer.get("status") == "ok":
                for m in ("tokens_per_s", "samples_per_s", "peak_rss_mb"):
                    if ours.get(m) and peer.get(m):
                        pairs.setdefault(m, []).append(ours[m] / peer[m])
        row["ratio"] = {m: spread(v) for m, v in pairs.items()}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ formatting


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _cell(s: dict | None, fmt=_num, percent: bool = False) -> str:
    if not s:
        return "-"
    f = (lambda v: f"{100 * v:.1f}%") if percent else fmt
    if s["n"] == 1 or s["min"] == s["max"]:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def markdown_table(rows: list[dict]) -> str:
    header = ("| stage | preset | side | train tokens/s | samples/s | peak RSS MiB | final metric | MFU |\n"
              "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |")
    lines = [header]
    for row in rows:
        for side in SIDES:
            s = row["sides"][side]
            status = row["status"][side]
            if status != "ok":
                reason = "; ".join(e.splitlines()[0][:140] for e in row["errors"].get(side, [])) or status
                lines.append(f"| {row['stage']} | {row['preset']} | {side} | {status}: {reason} | | | | |")
                continue
            metric = _cell(s["metric"], lambda v: f"{v:.4g}")
            if s.get("metric_name"):
                metric = f"{s['metric_name']} {metric}"
            if s.get("heldout_accuracy"):
                metric += f"; held-out acc. {_cell(s['heldout_accuracy'], percent=True)}"
            lines.append(f"| {row['stage']} | {row['preset']} | {side} | {_cell(s['tokens_per_s'])} | "
                         f"{_cell(s['samples_per_s'])} | {_cell(s['peak_rss_mb'])} | {metric} | "
                         f"{_cell(s['mfu'], percent=True)} |")
        r = row["ratio"]
        if r:
            lines.append(f"| {row['stage']} | {row['preset']} | **ours/peer** | "
                         f"**{_cell(r.get('tokens_per_s'), lambda v: f'{v:.2f}')}** | "
                         f"**{_cell(r.get('samples_per_s'), lambda v: f'{v:.2f}')}** | "
                         f"{_cell(r.get('peak_rss_mb'), lambda v: f'{v:.2f}')} | | |")
    return "\n".join(lines)


def merged_table(report_paths) -> str:
    """One Markdown table from several reports; a later report's row replaces an earlier one's."""
    rows = {}
    for path in report_paths:
        report = json.loads(Path(path).read_text())
        for row in report["summary"]:
            rows[(row["stage"], row["preset"])] = row
    order = {stage: i for i, stage in enumerate(STAGES)}
    ordered = sorted(rows.values(), key=lambda r: (PRESETS.index(r["preset"]) if r["preset"] in PRESETS else 9,
                                                    order.get(r["stage"], 99)))
    return markdown_table(ordered)


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------------------ entry


def run(plan: Plan, log=print) -> dict:
    """Run the plan; write <output>/benchmark-<time>.json and .md (and latest.*); return the report."""
    unknown = [s for s in plan.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    bad = [p for p in plan.presets if p not in PRESETS]
    if bad:
        raise ValueError(f"unknown preset(s) {bad}; presets: {', '.join(PRESETS)}")
    _EXTRA_ENV.clear()
    _EXTRA_ENV.update(plan.child_env)
    started = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join([Path(sys.executable).name, "-m", "benchmarks"] + sys.argv[1:]) if sys.argv else ""
    workdir = Path(tempfile.mkdtemp(prefix="align-bench-"))
    load = machine_info().get("load_average") or [0]
    log(f"[harness] work folder {workdir}; load average at start {load}; child environment {plan.child_env}")
    if load[0] > (os.cpu_count() or 1) and "OMP_WAIT_POLICY" not in plan.child_env:
        log("[harness] warning: the machine is oversubscribed; OpenMP threads that spin-wait make runs slow and "
            "erratic (up to 30x, see README): consider --child-env OMP_WAIT_POLICY=PASSIVE (applied to both sides)")
    peer_python, peer_error = None, None
    if "ppo" in plan.stages:
        from benchmarks import peer_env

        try:
            peer_python = peer_env.ensure(log=log)
        except peer_env.PeerEnvError as exc:
            peer_error = str(exc)
            log(f"[peer-env] unusable: {exc}")
    load_before = machine_info().get("load_average")
    ceiling_before = measure_ceiling(workdir, plan.ceiling_trials, log)
    runs = []
    assets = {}
    for preset in plan.presets:
        assets_json = prepare_assets(preset, workdir, log)
        assets[preset] = json.loads(assets_json.read_text())
        for stage in plan.stages:
            steps = plan.steps_for(stage, preset)
            for repeat in range(plan.repeats):
                for side in SIDES:
                    if stage == "ppo" and side == "peer" and peer_python is None:
                        result = {"status": "error", "error": f"trl 1.12.0 peer venv unusable: {peer_error}",
                                  "stage": stage, "preset": preset, "side": side, "repeat": repeat}
                    else:
                        result = one_run(plan, stage, preset, side, repeat, assets_json, workdir, peer_python)
                    runs.append(result)
                    log(_run_line(result, steps))
                if runs[-2].get("status") == "pending":
                    break  # our side cannot run yet: the peer's one run stays as a reference
    ceiling_after = measure_ceiling(workdir, plan.ceiling_trials, log)
    # MFU against the ceiling of the precision both sides ran (a bf16 run is not measured against fp32's)
    key = f"cpu_{plan.precision}"
    ceiling = max(ceiling_before[key]["best_gflops"], ceiling_after[key]["best_gflops"])
    add_mfu(runs, ceiling)
    rows = summarise_runs(runs)
    finished = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "label": plan.label,
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average_at_start": load_before},
        "precision": plan.precision,
        f"ceiling_gflops_{plan.precision}": ceiling,
        "ceiling": {"before": ceiling_before, "after": ceiling_after},
        "mfu_formula": f"MFU = 6 x matmul_params x train_tokens_per_s / ceiling_{plan.precision}_flops",
        "plan": {"stages": plan.stages, "presets": plan.presets, "repeats": plan.repeats,
                 "child_env": plan.child_env,
                 "steps": {s: {p: plan.steps_for(s, p) for p in plan.presets} for s in plan.stages},
                 "batch": plan.batch, "max_samples": plan.max_samples, "ours_set": plan.ours_set, "peer_set": plan.peer_set},
        "assets": assets,
        "summary": rows,
        "runs": runs,
    }
    table = markdown_table(rows)
    output = Path(plan.output)
    output.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    (output / f"benchmark-{stamp}.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown_report(report, table)
    (output / f"benchmark-{stamp}.md").write_text(md)
    (output / "latest.json").write_text(json.dumps(report, indent=1, default=str))
    (output / "latest.md").write_text(md)
    log("")
    log(table)
    log(f"\n[harness] wrote {output / f'benchmark-{stamp}.json'} and .md")
    if not plan.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    report["table"] = table
    return report


def _run_line(result: dict, steps: int) -> str:
    head = f"[run] {result['stage']:<12} {result['preset']:<3} {result['side']:<4} #{result['repeat']}"
    if result.get("status") != "ok":
        return f"{head} {result.get('status')}: {str(result.get('error', '')).splitlines()[0][:200]}"
    tps = result.get("tokens_per_s")
    return (f"{head} {steps} steps in {result['train_seconds']:.1f}s: {tps or 0:,.0f} tok/s, "
            f"{result.get('samples_per_s') or 0:.2f} samples/s, peak {result['peak_rss_mb']:.0f} MiB, "
            f"{result.get('metric_name')}={result.get('metric')}")


def markdown_report(report: dict, table: str) -> str:
    m = report["machine"]
    precision = report.get("precision", "fp32")  # reports written before the precision key were fp32
    lines = [
        f"# Benchmark {report['started']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {m.get('cpu', '?')}, {m.get('cpus')} CPUs, {m.get('memory_gib', '?')} GiB; "
        f"load average at start {m.get('load_average_at_start')}, at end {m.get('load_average')}",
        f"- precision: {precision} on both sides; measured {precision} matmul ceiling: "
        f"{report[f'ceiling_gflops_{precision}']} GFLOP/s "
        f"(before {report['ceiling']['before'][f'cpu_{precision}']['best_gflops']}, "
        f"after {report['ceiling']['after'][f'cpu_{precision}']['best_gflops']})",
        f"- {report['mfu_formula']}",
        f"- repeats {report['plan']['repeats']} (alternating ours, peer); steps {report['plan']['steps']}; "
        f"extra environment of every run {report['plan']['child_env'] or 'none'}",
        "- cells: median (min-max) over repeats; ratio rows: paired ours/peer per repeat",
        "",
        table,
        "",
    ]
    return "\n".join(lines)
