"""What the dashboard reads from a runs directory: runs and their state, pipelines, evaluation reports.

Read-only: nothing here writes into a run directory or takes its lock, so the dashboard can watch a run that
is training.  The state of a run directory comes from the files the stages write (alignment.checkpoint):

    finished    run_info.json with "complete": true
    running     its .lock is held by a live process (the stage holds it, flock, for as long as it runs)
    resumable   no complete run_info.json, nobody holds the lock, and a complete trainer checkpoint
                (checkpoints/checkpoint-N with its trainer_state.json): `--resume` (or the pipeline again)
                continues it
    failed      no complete run_info.json, nobody holds the lock, and no checkpoint to resume from

A pipeline's pipeline_state.json adds what the run directory cannot say: "interrupted" (stopped by a signal)
or "running" left behind by a stage that raised (failed).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import yaml

from alignment.checkpoint import CHECKPOINTS, RUN_DIR_MARKERS, RUN_INFO, is_complete, latest_checkpoint
from alignment.pipeline import STATE_FILE

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
# Sampled completions a stage logs while it trains, one JSON object per completion:
#   {"step": 10, "prompt": ..., "completion": ..., "reward": 1.0, ...any other columns}
# best-of-n's samples.jsonl (every sample with its score, no step) is read the same way, as step 0.
COMPLETIONS_FILES = ("completions.jsonl", "samples.jsonl")
# Folders inside a run directory that hold no runs of their own: not walked into
INSIDE_A_RUN = {CHECKPOINTS, "initial_model", "critic", "tensorboard", "wandb", "mlruns", ".staging"}
MAX_DEPTH = 6  # runs/<study>/<seed>/<pipeline>/<stage> and a little more

STATES = ("running", "resumable", "finished", "failed")


def relative(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return "" if rel == "." else rel


def resolve_inside(root: Path, rel: str) -> Path:
    """`root/rel`, refused (ValueError) when it leaves root (``..``, an absolute path, a link out)."""
    root = root.resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{rel!r} is outside the runs directory")
    return path


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_DIR_MARKERS) or (path / METRICS_FILE).is_file()


def lock_holder_alive(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (alignment.checkpoint.lock_run_dir).

    The lock file says "pid N on HOST".  On this host the pid is checked; from another host (a shared file
    system) a shared flock is tried and released at once: it fails while the run holds its exclusive lock.
    """
    lock = run_dir / ".lock"
    if not lock.is_file():
        return False
    try:
        words = lock.read_text(encoding="utf-8").split()
    except OSError:
        return False
    if len(words) >= 4 and words[0] == "pid" and words[1].isdigit() and words[2] == "on":
        pid, host = int(words[1]), words[3]
        if host == platform.node():
            if pid == os.getpid():  # a run in this very process (a test, a notebook): its lock is in the table
                from alignment.checkpoint import _LOCKS

                return str(run_dir.resolve()) in _LOCKS
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
    import fcntl

    try:
        with lock.open("r") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except OSError:
        return True
    return False


def read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path, start: int = 0) -> list[dict]:
    """The JSON objects of a .jsonl file from record `start` on; a line cut short by a kill is skipped."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a half-written last line while the run writes it: the next poll reads it whole
        if isinstance(value, dict):
            records.append(value)
    return records[start:]


def recipe_summary(run_dir: Path) -> dict:
    """Stage, model and the step target from the run's recipe.yaml (what was asked for)."""
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    train = recipe.get("train") or {}
    target = next((train[k] for k in ("max_steps", "total_steps", "num_steps") if isinstance(train.get(k), int)
                   and train[k] > 0), None)
    model = (recipe.get("model") or {}).get("name_or_path")
    return {"stage": recipe.get("stage"), "model": model, "target_steps": target}


def last_step(run_dir: Path) -> int | None:
    steps = [r["step"] for r in read_jsonl(run_dir / METRICS_FILE) if isinstance(r.get("step"), (int, float))]
    return int(max(steps)) if steps else None


def run_state(run_dir: Path, pipeline_status: str | None = None) -> dict:
    """{"state": one of STATES, "detail": a sentence for people, "checkpoint": the newest one or None}."""
    checkpoint = latest_checkpoint(run_dir)
    where = checkpoint.name if checkpoint else None
    if is_complete(run_dir):
        info = read_json_or_none(run_dir / RUN_INFO) or {}
        return {"state": "finished", "detail": f"finished {info.get('finished_at', '')}".strip(),
                "checkpoint": where}
    if lock_holder_alive(run_dir):
        return {"state": "running", "detail": "training now (its lock is held)", "checkpoint": where}
    if checkpoint is not None:
        why = {"interrupted": "interrupted by a signal", "running": "stopped by an error"}.get(
            pipeline_status or "", "stopped before it finished")
        how = "run the pipeline again" if pipeline_status else "align run <its recipe> --resume"
        return {"state": "resumable", "detail": f"{why}; resumable from {checkpoint.name} ({how})",
                "checkpoint": where}
    why = "interrupted by a signal" if pipeline_status == "interrupted" else "stopped"
    return {"state": "failed", "detail": f"{why} before its first checkpoint; nothing to resume, run it again",
            "checkpoint": None}


def describe_run(run_dir: Path, root: Path, pipeline_status: str | None = None) -> dict:
    summary = recipe_summary(run_dir)
    files = [name for name in COMPLETIONS_FILES if (run_dir / name).is_file()]
    return {"path": relative(run_dir, root), "name": run_dir.name, **run_state(run_dir, pipeline_status),
            **summary, "last_step": last_step(run_dir), "has_metrics": (run_dir / METRICS_FILE).is_file(),
            "completions": files, "tensorboard": (run_dir / "tensorboard").is_dir()}


def describe_pipeline(folder: Path, root: Path) -> dict:
    """A pipeline's stages (in pipeline_state.json's order) with their run states; its overall state."""
    state = read_json_or_none(folder / STATE_FILE) or {}
    stages = []
    for name, entry in state.items():
        status = entry.get("status") if isinstance(entry, dict) else None
        run_dir = folder / name
        stage = describe_run(run_dir, root, status) if run_dir.is_dir() else \
            {"path": relative(run_dir, root), "name": name, "state": "failed", "detail": "no run directory"}
        stages.append({"name": name, "status": status, **{k: stage[k] for k in ("path", "state", "detail")}})
    states = {s["state"] for s in stages}
    overall = next((s for s in ("running", "failed", "resumable") if s in states), "finished" if stages else "failed")
    reports = [relative(p.parent, root) for p in sorted(folder.glob(f"*/{REPORT_FILE}"))]
    return {"path": relative(folder, root), "name": folder.name or root.name, "state": overall,
            "stages": stages, "reports": reports}


def scan(root: str | os.PathLike) -> dict:
    """Every run, pipeline and evaluation report under `root` (the folder itself included)."""
    root = Path(root).resolve()
    runs, pipelines, reports = [], [], []
    pipeline_status: dict[Path, str | None] = {}
    found_pipelines = []

    def walk(folder: Path, depth: int) -> None:
        if (folder / STATE_FILE).is_file():
            found_pipelines.append(folder)
        if (folder / REPORT_FILE).is_file():
            reports.append(folder)
        if is_run_dir(folder):
            runs.append(folder)
            return  # a run directory holds checkpoints, not runs
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if child.name not in INSIDE_A_RUN and not child.name.startswith(f"{CHECKPOINTS}."):
                walk(child, depth + 1)

    walk(root, 0)
    for folder in found_pipelines:
        pipeline = describe_pipeline(folder, root)
        pipelines.append(pipeline)
        for stage in pipeline["stages"]:
            pipeline_status[resolve_inside(root, stage["path"])] = stage["status"]
    run_entries = []
    for run_dir in runs:
        entry = describe_run(run_dir, root, pipeline_status.get(run_dir.resolve()))
        entry["pipeline"] = relative(run_dir.parent, root) if (run_dir.parent / STATE_FILE).is_file() else None
        run_entries.append(entry)
    report_entries = []
    for folder in reports:
        data = read_json_or_none(folder / REPORT_FILE) or {}
        report_entries.append({"path": relative(folder, root), "title": data.get("title") or folder.name,
                               "created": data.get("created"), "checkpoints": list(data.get("checkpoints") or {})})
    return {"root": str(root), "runs": run_entries, "pipelines": pipelines, "reports": report_entries}


def completions(run_dir: Path) -> dict:
    """The sampled completions a stage logged, grouped by step: {"steps": [...], "by_step": {step: [...]}}."""
    by_step: dict[int, list] = {}
    for name in COMPLETIONS_FILES:
        for record in read_jsonl(run_dir / name):
            step = record.get("step", 0)
            by_step.setdefault(int(step) if isinstance(step, (int, float)) else 0, []).append(record)
    return {"steps": sorted(by_step), "by_step": {str(k): v for k, v in sorted(by_step.items())}}
