"""Experiment trackers for every stage: the records of metrics.jsonl, sent as they are written.

    trackers = Trackers(recipe.train.report_to, run_dir, config=redacted_recipe_dict, run_name="ppo")
    trackers.log({"step": 3, "time": 1733000000.0, "objective/kl": 0.02, "reward/total": 0.5})
    trackers.close()

``report_to`` takes the names transformers' ``TrainingArguments.report_to`` takes for these four trackers
(``tensorboard``, ``wandb``, ``mlflow``, ``trackio``, a list of them, or ``none``), so one recipe key means the
same for trl's stages and ours.  Each record is logged under exactly the names metrics.jsonl has, at the record's
``step``: a chart in a tracker and a line of metrics.jsonl never disagree.  The run's config is the resolved
recipe with its secrets redacted (`alignment.recipe.redact`), as recipe.yaml holds it.

Where each tracker writes:

* tensorboard: ``<run_dir>/tensorboard/`` (event files; ``tensorboard --logdir <run_dir>/tensorboard``);
* wandb: its own service, ``WANDB_PROJECT`` (default ``alignment``); ``WANDB_MODE=offline`` keeps it on disk
  (``<run_dir>/wandb/``);
* mlflow: ``MLFLOW_TRACKING_URI`` (mlflow's own default otherwise), experiment ``MLFLOW_EXPERIMENT_NAME``
  (default ``alignment``);
* trackio: its local store (``TRACKIO_DIR``), project ``TRACKIO_PROJECT`` (default ``alignment``).

The packages come with ``pip install -e '.[tracking]'``; a recipe naming a tracker whose package is missing is
refused by `require_tracker_packages` before any model loads.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
from pathlib import Path

from alignment.errors import RecipeError

__all__ = ["TRACKERS", "Trackers", "normalise_report_to", "require_tracker_packages"]

EXTRA = "pip install -e '.[tracking]'"

# report_to name -> (module imported, package installed)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),  # torch.utils.tensorboard writes; the package must be there
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
NONE = "none"
TENSORBOARD_DIR = "tensorboard"
# keys every metrics.jsonl record carries that are not metrics: the x axis and the wall clock
NOT_METRICS = ("step", "time")


def normalise_report_to(value) -> list[str]:
    """The tracker names of a ``report_to`` value: ``"none"`` / None / [] -> []; a name, a comma list or a list.

    An unknown name is a ValueError that lists the valid ones (and the closest, when one is close).
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"report_to must be a tracker name or a list of names, got {type(value).__name__}")
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"report_to: {item!r} is not a tracker name (valid: {', '.join(TRACKERS)}, {NONE})")
        name = item.strip().lower()
        if name in ("", NONE):
            continue
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"report_to: unknown tracker {item!r}{hint} (valid: {', '.join(TRACKERS)}, or {NONE})")
        if name not in names:
            names.append(name)
    return names


def require_tracker_packages(names, where: str = "report_to") -> None:
    """Refuse, before anything heavy is built, trackers whose package is not installed (RecipeError).

    ``where`` starts the message (e.g. ``"recipes/tiny/ppo.yaml: train.report_to"``).
    """
    for name in normalise_report_to(names):
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise RecipeError(f"{where}: {name} needs the {package!r} package, which is not installed; install the "
                              f"trackers with {EXTRA} (or `pip install {package}`), or set report_to: none")


def numeric_metrics(record: dict) -> dict[str, float]:
    """The record's metrics: every int or float value except ``step`` and ``time`` (a bool is no metric)."""
    return {key: float(value) for key, value in record.items()
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as ``section.key: value`` strings (mlflow's params are flat strings)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, run_name: str):
        self.log_dir, self.config, self.run_name = run_dir / TENSORBOARD_DIR, config, run_name
        self.writer = None

    def _open(self, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run logs again from the step after its checkpoint; tensorboard's readers drop
        # the interrupted run's events from that step on, as metrics.jsonl drops its lines (MetricsLog.trim)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=first_step)
        self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, default=str) + "\n```", first_step)

    def log(self, metrics: dict, step: int, wall_time: float | None):
        if self.writer is None:
            self._open(step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=wall_time)
        self.writer.flush()  # a live `tensorboard --logdir` (or the dashboard) sees each step as it happens

    def close(self):
        if self.writer is not None:
            self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, config: dict, run_name: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "alignment"), name=run_name,
                              dir=str(run_dir), config=config)

    def log(self, metrics: dict, step: int, wall_time: float | None):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict, run_name: str):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_EXPERIMENT_NAME") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            mlflow.set_experiment("alignment")
        self.run = mlflow.start_run(run_name=run_name)
        # params are short strings in mlflow (a few hundred characters); the whole recipe goes in as a file too
        params = {k: v[:500] for k, v in flat_config(config).items()}
        for start in range(0, len(params), 100):  # log_params takes at most 100 at a time
            mlflow.log_params(dict(list(params.items())[start:start + 100]))
        mlflow.log_dict(config, "recipe.json")

    def log(self, metrics: dict, step: int, wall_time: float | None):
        stamp = None if wall_time is None else int(wall_time * 1000)
        self.mlflow.log_metrics(metrics, step=step, timestamp=stamp)

    def close(self):
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, run_dir: Path, config: dict, run_name: str):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "alignment"), name=run_name, config=config)

    def log(self, metrics: dict, step: int, wall_time: float | None):
        self.trackio.log(metrics, step=step)

    def close(self):
        self.trackio.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow, "trackio": _Trackio}


class Trackers:
    """The run's trackers (possibly none): `log` one metrics.jsonl record, `close` at the end of the run."""

    def __init__(self, names, run_dir: str | os.PathLike, config: dict, run_name: str):
        from alignment.recipe import redact

        self.names = normalise_report_to(names)
        require_tracker_packages(self.names)
        run_dir = Path(run_dir)
        clean = redact(dict(config or {}))  # no tracker, local or hosted, ever receives a secret
        self._backends = []
        try:
            for name in self.names:
                self._backends.append(_BACKENDS[name](run_dir, clean, run_name))
        except BaseException:
            self.close()
            raise

    def __bool__(self) -> bool:
        return bool(self._backends)

    def log(self, record: dict) -> None:
        """Log every numeric key of one metrics.jsonl record under exactly its name at ``record["step"]``."""
        if not self._backends:
            return
        metrics = numeric_metrics(record)
        if not metrics:
            return
        step = int(record.get("step", 0))
        wall_time = record.get("time")
        wall_time = float(wall_time) if isinstance(wall_time, (int, float)) and math.isfinite(wall_time) else None
        for backend in self._backends:
            backend.log(metrics, step, wall_time)

    def close(self) -> None:
        backends, self._backends = self._backends, []
        for backend in backends:
            backend.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
