"""Optional standard benchmarks for `align eval --lm-eval TASKS`, through EleutherAI's lm-evaluation-harness.

    pip install lm-eval            # or: pip install 'alignment-toolkit[lm-eval]'
    align eval runs/tiny/sft runs/tiny/dpo --spec recipes/tiny/eval.yaml --output runs/tiny/eval \\
        --lm-eval arc_easy,hellaswag --lm-eval-limit 100

Each policy checkpoint directory is handed to ``lm_eval.simple_evaluate`` as
``model="hf", model_args={"pretrained": <dir>}`` on the GPU when there is one,
else the CPU.  The harness is an optional extra: when it is not installed the
section says ``skipped`` and why, and the rest of the evaluation goes on; no
number is ever made up.  A task that fails for a checkpoint is recorded as that
checkpoint's ``error``, so one bad task name does not lose the other metrics.
"""

from __future__ import annotations

import importlib
import math

INSTALL = "pip install lm-eval"


def parse_tasks(text: str | None) -> list[str]:
    """`arc_easy, hellaswag` -> ["arc_easy", "hellaswag"] (blank entries dropped)."""
    return [task.strip() for task in (text or "").split(",") if task.strip()]


def load_harness():
    """lm_eval's `simple_evaluate`, or None when the optional package is not installed."""
    try:
        module = importlib.import_module("lm_eval")
    except ImportError:
        return None
    evaluate = getattr(module, "simple_evaluate", None)
    return evaluate or importlib.import_module("lm_eval.evaluator").simple_evaluate


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def numeric_metrics(task_result: dict) -> dict:
    """The numbers of one task's result (`acc,none`, `acc_stderr,none`, ...); aliases and "N/A" dropped."""
    return {key: float(value) for key, value in task_result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def checkpoint_scores(evaluate, path: str, tasks: list[str], limit: int | None, on: str) -> dict:
    """{task: {metric: value}} of one checkpoint; {"error": text} when the harness raised."""
    try:
        output = evaluate(model="hf", model_args={"pretrained": str(path)}, tasks=list(tasks), limit=limit,
                          device=on, log_samples=False)
    except Exception as exc:  # a wrong task name, a model the harness cannot load: report it, keep the rest
        return {"error": f"{type(exc).__name__}: {exc}"}
    results = (output or {}).get("results") or {}
    return {"tasks": {task: numeric_metrics(values) for task, values in results.items()}}


def run_lm_eval(checkpoints: dict[str, str], tasks: list[str], limit: int | None = None) -> dict:
    """The report's `lm_eval` section: every checkpoint's harness scores, or `skipped` with the reason."""
    section = {"tasks": list(tasks), "limit": limit}
    evaluate = load_harness()
    if evaluate is None:
        reason = f"the lm_eval package is not installed ({INSTALL})"
        print(f"lm-eval: skipped: {reason}", flush=True)
        return {**section, "status": "skipped", "reason": reason}
    on = device()
    results = {}
    for name, path in checkpoints.items():
        print(f"lm-eval: {name} on {', '.join(tasks)} ({on})", flush=True)
        results[name] = checkpoint_scores(evaluate, path, tasks, limit, on)
        if "error" in results[name]:
            print(f"lm-eval: {name}: {results[name]['error']}", flush=True)
    return {**section, "status": "ok", "device": on, "checkpoints": results}


def metric_label(key: str) -> str:
    """`acc,none` -> `acc`; `exact_match,strict-match` -> `exact_match (strict-match)`."""
    metric, _, kind = key.partition(",")
    return metric if kind in ("", "none") else f"{metric} ({kind})"


def table_rows(section: dict) -> list[tuple[str, str, dict[str, str]]]:
    """(task, metric, {checkpoint: "value ± stderr"}) for every metric any checkpoint has."""
    scores = {name: entry.get("tasks") or {} for name, entry in (section.get("checkpoints") or {}).items()}
    rows = []
    for task in sorted({t for per_task in scores.values() for t in per_task}):
        keys = sorted({k for per_task in scores.values() for k in per_task.get(task, {}) if "_stderr" not in k})
        for key in keys:
            cells = {name: cell(per_task.get(task, {}), key) for name, per_task in scores.items()}
            rows.append((task, metric_label(key), cells))
    return rows


def cell(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None or not math.isfinite(value):
        return "—"
    metric, _, kind = key.partition(",")
    stderr = metrics.get(f"{metric}_stderr,{kind}" if kind else f"{metric}_stderr")
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None and math.isfinite(stderr) else "")


def markdown(section: dict) -> list[str]:
    """The `lm-evaluation-harness` part of report.md."""
    lines = ["## lm-evaluation-harness", ""]
    if section.get("status") != "ok":
        return lines + [f"Skipped: {section.get('reason', 'not run')}.", ""]
    names = list(section.get("checkpoints") or {})
    rows = table_rows(section)
    if rows:
        lines += ["| task | metric | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "| :--- | :--- | " + " | ".join("---:" for _ in names) + " |"]
        lines += [f"| {task} | {metric} | " + " | ".join(cells.get(n, "—") for n in names) + " |"
                  for task, metric, cells in rows]
    for name in names:
        error = section["checkpoints"][name].get("error")
        if error:
            lines += ["", f"`{name}`: failed: {error}"]
    limit = section.get("limit")
    note = f"; at most {limit} examples per task (a smoke test: not comparable to published scores)" if limit else ""
    return lines + ["", f"<sub>lm_eval simple_evaluate, HF backend on {section.get('device')}{note}.</sub>", ""]
