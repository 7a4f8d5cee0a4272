"""The seed study: run a demo pipeline once per seed and report the spread of every result.

    python -m benchmarks efficacy --seeds 0,1,2,3,4
    python -m benchmarks efficacy --seeds 0,1,2 --isa avx2      # the AVX2 kernel path on an AVX-512 CPU
    python -m benchmarks efficacy --study tools --jobs 2        # the tool demo, two seeds at a time

Each seed runs ``align pipeline PIPELINE seed=S output_root=WORK/seed-S`` in a
fresh directory (a child process, so the ISA variables reach torch before it
loads).  From each seed's ``eval/report.json`` it takes every checkpoint's
held-out numbers (nested ones such as ``by_carry`` flattened to
``by_carry/true/...``), and from the run directories the stage times and the
worst value of each training health signal.  It prints one table of the
study's columns (per seed, then min / median / max), checks the study's claims
on every seed, names the CPU, the kernel path torch used and the package
versions, and writes the JSON and Markdown next to each other.

A study (:data:`STUDIES`) is a pipeline with its columns and its claims:
``arith`` (the default pipeline: SFT, reward model, DPO, PPO on tiny_arith) and
``tools`` (the tool demo, docs/agents.md: SFT, PPO with the calculator, the same
PPO with the tool results withheld).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PIPELINE = "recipes/tiny/pipeline.yaml"
MAX_PIPELINE_SECONDS = 600.0  # the demo's promise: the whole pipeline in 10 minutes on 2 cores

# What forcing the AVX2 path sets, and what each variable changes (measured on an AMD EPYC with AVX-512):
#   ATEN_CPU_CAPABILITY      torch's own vectorised kernels (softmax, norms, elementwise, the optimizer):
#                            torch.backends.cpu.get_cpu_capability() goes AVX512 -> AVX2 (`kernel_path` asks it)
#   MKL_ENABLE_INSTRUCTIONS  MKL's sgemm, which serves torch's fp32 nn.Linear: on that AMD CPU MKL takes the
#                            same path whatever it says (a 300x300 product is bit-identical for SSE4_2, AVX2
#                            and AVX512); on an Intel CPU it selects the AVX-512 or AVX2 sgemm
#   ONEDNN_MAX_CPU_ISA       oneDNN's JIT: bf16 matmuls and convolutions only (fp32 Linear is MKL's); with
#                            AVX2, bf16 matmuls leave oneDNN for torch's slow fallback
ISA_ENVIRONMENTS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

# (checkpoint, metric) columns of the arith study's table, in order
COLUMNS = [
    ("sft", "greedy_accuracy"), ("sft", "sampled_accuracy"),
    ("sft_control", "greedy_accuracy"), ("sft_control", "sampled_accuracy"),
    ("dpo", "greedy_accuracy"), ("dpo", "sampled_accuracy"), ("dpo", "kl_to_reference"),
    ("ppo", "greedy_accuracy"), ("ppo", "sampled_accuracy"), ("ppo", "kl_to_reference"),
    ("reward_model", "preference_accuracy"),
]


@dataclass(frozen=True)
class Claim:
    """One promise of the demo, checked on every seed: `value(row) >= threshold`."""

    text: str
    threshold: float
    left: tuple
    minus: tuple | None = None  # the value is left - minus (a gain over another checkpoint)

    def value(self, row: dict) -> float | None:
        left = row.get(self.left)
        right = 0.0 if self.minus is None else row.get(self.minus)
        return None if left is None or right is None else left - right


G = "greedy_accuracy"
CARRY_CALLS = "by_carry/true/greedy/env/tool_call_rate"  # greedy tool-call rate on the carry problems
CLAIMS = [
    Claim("SFT >= 45% greedy", 0.45, ("sft", G)),
    Claim("reward model >= 85% held-out pair accuracy", 0.85, ("reward_model", "preference_accuracy")),
    Claim("DPO >= SFT + 10 points greedy", 0.10, ("dpo", G), ("sft", G)),
    Claim("DPO >= SFT control + 5 points greedy", 0.05, ("dpo", G), ("sft_control", G)),
    Claim("PPO >= SFT + 10 points greedy", 0.10, ("ppo", G), ("sft", G)),
    Claim("PPO >= SFT control + 5 points greedy", 0.05, ("ppo", G), ("sft_control", G)),
]


# The tool demo's columns and claims: held-out greedy episodes in the calculator environment (the control in its
# own one-turn environment); "before" is the SFT model
TOOLS_COLUMNS = [
    ("sft_tools", G), ("ppo_tools", G), ("ppo_tools_off", G),
    ("sft_tools", CARRY_CALLS), ("ppo_tools", CARRY_CALLS),
    ("sft_tools", "by_carry/false/greedy/env/tool_call_rate"), ("ppo_tools", "by_carry/false/greedy/env/tool_call_rate"),
    ("ppo_tools", "greedy/env/malformed_call_rate"), ("ppo_tools", "train_malformed_call_rate_max"),
    # sampled episodes (temperature 1): how often each model tries a call, and whether the SFT model's calls pay
    ("sft_tools", "sampled/env/tool_call_rate"), ("ppo_tools", "sampled/env/tool_call_rate"),
    ("sft_tools", "sampled/accuracy_with_call"), ("sft_tools", "sampled/accuracy_without_call"),
]
TOOLS_CLAIMS = [
    Claim("PPO + calculator >= SFT + 15 points greedy", 0.15, ("ppo_tools", G), ("sft_tools", G)),
    Claim("PPO + calculator >= PPO without tool results + 5 points greedy", 0.05, ("ppo_tools", G),
          ("ppo_tools_off", G)),
    Claim("greedy tool-call rate on carry problems rises >= 10 points", 0.10, ("ppo_tools", CARRY_CALLS),
          ("sft_tools", CARRY_CALLS)),
]


@dataclass(frozen=True)
class Study:
    """A pipeline, the table's columns and the claims that must hold on every seed."""

    pipeline: str
    columns: tuple
    claims: tuple
    max_pipeline_seconds: float | None  # a promise on each seed's wall time (None: none)
    caption: str


STUDIES = {
    "arith": Study(DEFAULT_PIPELINE, tuple(COLUMNS), tuple(CLAIMS), MAX_PIPELINE_SECONDS,
                   "Accuracies in %, held-out (500 prompts; reward model: 500 pairs); KL to the SFT model in nats "
                   "per sequence."),
    "tools": Study("recipes/tiny/pipeline_tools.yaml", tuple(TOOLS_COLUMNS), tuple(TOOLS_CLAIMS), None,
                   "Held-out greedy episodes (500 additions of two numbers in 500..999), in %: accuracy, tool-call "
                   "rate on carry / non-carry problems, malformed-call rate; train malformed max: the largest share "
                   "of sampled training episodes with a malformed call in one PPO step; sampled: the same 500 "
                   "prompts played once at temperature 1 (tool-call rate, accuracy of the episodes that called "
                   "and of those that answered directly)."),
}


def label(name: str, metric: str) -> str:
    """A table header for a (checkpoint, metric) column."""
    short = (metric.replace("_accuracy", "").replace("kl_to_reference", "KL").replace("greedy/env/", "")
             .replace("sampled/env/", "sampled ").replace("sampled/", "sampled ")
             .replace("by_carry/true/", "carry ").replace("by_carry/false/", "no-carry ").replace("_rate", "")
             .replace("train_malformed_call_max", "train malformed max").replace("_", " "))
    return f"{name} {short}"


def flatten(metrics: dict, prefix: str = "") -> dict:
    """Numeric metrics of a report entry, nested dicts joined with '/' (KL to the reference: its k1 estimate)."""
    out = {}
    for metric, value in metrics.items():
        key = prefix + metric
        if isinstance(value, dict) and metric == "kl_to_reference":
            value = value.get("k1")
        if isinstance(value, dict):
            out.update(flatten(value, key + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def seed_row(root: Path) -> dict:
    """(checkpoint, metric) -> value for one seed's pipeline output, plus stage times."""
    report = json.loads((root / "eval" / "report.json").read_text())
    row: dict = {}
    for name, entry in report["checkpoints"].items():
        row.update({(name, metric): value for metric, value in flatten(entry.get("metrics", {})).items()})
    for stage_dir in sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()):
        seconds = json.loads((stage_dir / "metrics.json").read_text()).get("train_seconds")
        if seconds is not None:
            row[(stage_dir.name, "seconds")] = float(seconds)
        row.update({(stage_dir.name, key): value for key, value in health_extremes(stage_dir).items()})
    return row


# The RL health signals over a run's training steps, and the worst value each reached: how far a healthy
# demo run stays from the health thresholds (the defaults must never fire on it).
HEALTH_SIGNALS = {"objective/kl": ("train_kl_max", max), "objective/entropy": ("train_entropy_min", min),
                  "val/eos_rate": ("train_eos_rate_min", min),
                  "env/malformed_call_rate": ("train_malformed_call_rate_max", max)}


def health_extremes(run_dir: Path) -> dict:
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return {}
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    extremes = {}
    for signal, (name, worst) in HEALTH_SIGNALS.items():
        values = [line[signal] for line in lines if isinstance(line.get(signal), (int, float))]
        if values:
            extremes[name] = float(worst(values))
    return extremes


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def summarise(rows: dict[int, dict]) -> dict:
    """'checkpoint/metric' -> min / median / max over the seeds that have it."""
    keys = sorted({key for row in rows.values() for key in row})
    return {f"{n}/{m}": spread([row[(n, m)] for row in rows.values() if (n, m) in row]) for n, m in keys}


def check_claims(rows: dict[int, dict], claims=CLAIMS) -> list[dict]:
    """Each claim's value per seed and whether it holds on every seed."""
    results = []
    for claim in claims:
        per_seed = {seed: claim.value(row) for seed, row in rows.items()}
        holds = [v is not None and v >= claim.threshold - 1e-9 for v in per_seed.values()]
        results.append({"claim": claim.text, "per_seed": per_seed, "holds_on": sum(holds), "seeds": len(holds)})
    return results


def kernel_path(env: dict, forced: dict) -> dict:
    """The CPU and the kernel path torch takes under `env` (asked of a child, where the variables apply);
    `forced` names the ISA variables among them."""
    probe = ("import json, torch; print(json.dumps({'aten_capability': torch.backends.cpu.get_cpu_capability(),"
             " 'torch': torch.__version__, 'threads': torch.get_num_threads()}))")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["cpu"] = cpu_model()
    info["cpu_flags"] = sorted(set(cpu_flags()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8",
                                                  "avx512_vnni", "avx_vnni"})
    info["forced"] = forced
    return info


def cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (None off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    return (cpuinfo_field("flags") or "").split()


def run_seed(pipeline: str, seed: int, root: Path, env: dict, log_path: Path, timeout: float | None,
             overrides: tuple = ()) -> dict:
    """One pipeline run in a fresh directory; returns its status, wall time and results."""
    command = [sys.executable, "-m", "alignment.cli", "pipeline", pipeline, f"seed={seed}", f"output_root={root}",
               *overrides]
    started = time.time()
    with open(log_path, "w") as log:
        try:
            finished = subprocess.run(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout)
            status = "ok" if finished.returncode == 0 else f"exit {finished.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f}s"
    seconds = time.time() - started
    row = seed_row(root) if status == "ok" else {}
    return {"seed": seed, "status": status, "seconds": round(seconds, 1), "row": row, "log": str(log_path)}


def git_commit() -> str | None:
    """The commit the study ran (its numbers belong to that code), with '+changes' for a dirty tree."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.strip() + ("+changes" if dirty.strip() else "")


def versions_of(root: Path) -> dict:
    for info in sorted(root.glob("*/run_info.json")):
        data = json.loads(info.read_text())
        if "versions" in data:
            return data["versions"]
    return {}


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric in ("kl_to_reference",):
        return f"{value:.2f}"
    if metric == "seconds":
        return f"{value:.0f}"
    return f"{100 * value:.1f}"


def markdown(report: dict) -> str:
    runs = [r for r in report["runs"] if r["status"] == "ok"]
    study = STUDIES[report.get("study", "arith")]
    columns = [tuple(c) for c in report.get("columns", study.columns)]
    header = ["seed", "pipeline s"] + [label(name, metric) for name, metric in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for run in report["runs"]:
        cells = [str(run["seed"]), f"{run['seconds']:.0f}" + ("" if run["status"] == "ok" else f" ({run['status']})")]
        cells += [fmt(metric, run["row"].get(f"{name}/{metric}")) for name, metric in columns]
        lines.append("| " + " | ".join(cells) + " |")
    for stat in ("min", "median", "max"):
        cells = [f"**{stat}**", fmt("seconds", report["pipeline_seconds"][stat]) if runs else "-"]
        for name, metric in columns:
            summary = report["summary"].get(f"{name}/{metric}")
            cells.append(fmt(metric, summary[stat]) if summary else "-")
        lines.append("| " + " | ".join(cells) + " |")
    path = report["kernel_path"]
    forced = f" with `precision={report['precision']}`" if report.get("precision") else ""
    text = [f"Seed study of `{report['pipeline']}`{forced} ({len(runs)} of {len(report['runs'])} seeds finished), "
            f"{report['date']}",
            f"CPU: {path['cpu']} ({', '.join(path['cpu_flags']) or 'no AVX2'}); torch kernel path "
            f"{path['aten_capability']}" + (f", forced by {path['forced']}" if path["forced"] else "") +
            f"; {path['threads']} threads" + (f", {report['jobs']} seeds at a time (wall times under that load)"
                                               if report.get("jobs", 1) > 1 else ""),
            "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items())) +
            (f"; commit {report['commit']}" if report.get("commit") else "") +
            (f"; re-tabulated {report['rebuilt']['date']} at commit {report['rebuilt']['commit']}"
             if report.get("rebuilt") else ""),
            study.caption, "", *lines, "", "| claim (every seed) | holds on | per seed |", "|---|---:|---|"]
    for claim in report["claims"]:
        values = ", ".join("-" if v is None else f"{100 * v:+.1f}" for v in claim["per_seed"].values())
        text.append(f"| {claim['claim']} | {claim['holds_on']} of {claim['seeds']} | {values} |")
    extra = [key for key in sorted(report["summary"]) if key.split("/", 1)[1] in EXTRA_METRICS]
    if extra:
        text += ["", "| stage: seconds of training, worst health signal over training | min | median | max |",
                 "|---|---:|---:|---:|"]
        for key in extra:
            summary = report["summary"][key]
            text.append(f"| {key} | " + " | ".join(f"{summary[s]:.3g}" for s in ("min", "median", "max")) + " |")
    return "\n".join(text)


EXTRA_METRICS = {"seconds", *(name for name, _ in HEALTH_SIGNALS.values())}


def rebuild(work: Path, output: str = "benchmarks/results/") -> dict:
    """Re-read a finished study's run directories (its JSON names them) and rewrite its table."""
    stamp_isa = work.name
    previous = Path(output) / f"efficacy-{stamp_isa}.json"
    if not previous.is_file():
        raise SystemExit(f"--rebuild {work}: no {previous} (the study's JSON names its runs; pass its --output)")
    report = json.loads(previous.read_text())
    rows = {}
    for run in report["runs"]:
        if run["status"] == "ok":
            rows[run["seed"]] = seed_row(work / f"seed-{run['seed']}")
            run["row"] = {f"{n}/{m}": v for (n, m), v in rows[run["seed"]].items()}
    spec = STUDIES[report.get("study", "arith")]
    report["summary"] = summarise(rows)
    report["columns"] = [list(c) for c in spec.columns]  # today's columns: a rebuild may add some (re-run evals)
    report["claims"] = check_claims(rows, spec.claims)
    report["rebuilt"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit()}
    return write(report, Path(output), f"efficacy-{stamp_isa}")


def write(report: dict, out: Path, name: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / f"{name}.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwritten: {out / name}.json and .md")
    return report


def run_study(seeds: list[int], pipeline: str | None = None, isa: str = "default",
              workdir: str = "runs/efficacy", output: str = "benchmarks/results/",
              timeout: float | None = None, study: str = "arith", jobs: int = 1, precision: str | None = None) -> dict:
    """Run `study`'s pipeline (or `pipeline`) once per seed, `jobs` seeds at a time, and write the table.

    ``precision`` (auto | fp32 | bf16 | fp16): every stage's, through the pipeline's `precision` key (None: each
    recipe's own, auto by default).

    With ``jobs > 1`` each child gets ``OMP_NUM_THREADS = cores // jobs`` (unless set), so the seeds share the
    cores instead of oversubscribing them; the wall times are then measured under that load, and the table says so.
    """
    spec = STUDIES[study]
    pipeline = pipeline or spec.pipeline
    if timeout is None and spec.max_pipeline_seconds is not None:
        timeout = 2 * spec.max_pipeline_seconds
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           **ISA_ENVIRONMENTS[isa]}
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or jobs) // jobs))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    commit = git_commit()  # the code the runs start from (the tree may move on while a long study runs)
    name = "-".join([stamp] + ([study] if study != "arith" else []) + [isa] + ([precision] if precision else []))
    overrides = (f"precision={precision}",) if precision else ()
    work = Path(workdir) / name
    work.mkdir(parents=True, exist_ok=True)
    path = kernel_path(env, ISA_ENVIRONMENTS[isa])
    print(f"seed study {study}: {pipeline}{' ' + ' '.join(overrides) if overrides else ''}, seeds {seeds}, {jobs} at a time, CPU {path['cpu']}, torch kernel path "
          f"{path['aten_capability']}{' (forced ' + isa + ')' if path['forced'] else ''}; runs under {work}",
          flush=True)

    def one(seed: int) -> dict:
        result = run_seed(pipeline, seed, work / f"seed-{seed}", env, work / f"seed-{seed}.log", timeout, overrides)
        print(f"  seed {seed}: {result['status']} in {result['seconds']:.0f}s  " +
              "  ".join(f"{label(n, m)} {fmt(m, result['row'].get((n, m)))}" for n, m in spec.columns
                        if m in (G, "preference_accuracy")), flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        runs = list(pool.map(one, seeds))
    finished = [r for r in runs if r["status"] == "ok"]
    summary = summarise({r["seed"]: r["row"] for r in finished})
    claims = check_claims({r["seed"]: r["row"] for r in finished}, spec.claims)
    for r in runs:
        r["row"] = {f"{n}/{m}": v for (n, m), v in r["row"].items()}
    limit = spec.max_pipeline_seconds
    report = {
        "study": study, "pipeline": pipeline, "isa": isa, "jobs": jobs, "precision": precision, "date": time.strftime("%Y-%m-%d %H:%M"),
        "kernel_path": path, "commit": commit,
        "versions": versions_of(work / f"seed-{seeds[0]}") if seeds else {},
        "columns": [list(c) for c in spec.columns],
        "runs": runs, "summary": summary, "claims": claims,
        "pipeline_seconds": spread([r["seconds"] for r in finished]) if finished else {},
        "within_time_limit": limit is None or all(r["seconds"] <= limit for r in finished),
        "time_limit_seconds": limit,
    }
    return write(report, Path(output), f"efficacy-{name}")


def all_claims_hold(report: dict) -> bool:
    finished = [r for r in report["runs"] if r["status"] == "ok"]
    return (len(finished) == len(report["runs"]) and report["within_time_limit"]
            and all(c["holds_on"] == c["seeds"] for c in report["claims"]))
