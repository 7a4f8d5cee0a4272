"""Steps every stage shares: seeding, run-directory set-up, trainer configs, logging, held-out checks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from alignment.checkpoint import CHECKPOINTS, base_run_info, mark_incomplete, resume_checkpoint
from alignment.errors import RecipeError


def offline_defaults() -> None:
    """No telemetry calls from trainer set-up (they hang or fail on machines without internet)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# Keys that may change when resuming: they extend or observe the run, they don't change what it learns.
RESUMABLE_CHANGES = {"resume", "output_dir", "max_steps", "num_train_epochs", "save_steps", "logging_steps",
                     "save_total_limit", "report_to", "eval", "disable_tqdm", "logging_dir"}


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two raw recipes (ignoring RESUMABLE_CHANGES)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [] if old == new else [prefix.rstrip(".")]
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES:
            continue
        changed += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
    return changed


def check_resume_matches(recipe, run_dir: Path) -> None:
    """Refuse to resume a run whose data, seed or hyper-parameters changed, unless resume: force."""
    import yaml

    from alignment.data import data_fingerprint

    saved_path = run_dir / "recipe.yaml"
    if recipe.resume == "force" or not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    current = yaml.safe_load(recipe.resolved_yaml())
    changed = changed_keys(saved, current)
    fingerprints = run_dir / "data_fingerprints.json"
    if fingerprints.is_file():
        old = json.loads(fingerprints.read_text())
        changed += [f"data file {path}" for path, digest in old.items() if data_fingerprint(path) != digest]
    if changed:
        raise RecipeError(f"{recipe.source_path}: cannot resume {run_dir}: changed since it started: "
                          f"{', '.join(changed)}. Undo the change, or set resume=force to resume anyway")


def check_output_dir(recipe) -> Path:
    """A relative output_dir must stay under the current folder (no `..` or symlink escape)."""
    raw = Path(recipe.output_dir)
    if raw.is_absolute():
        return raw
    root = Path.cwd().resolve()
    resolved = (root / raw).resolve()
    if resolved != root and root not in resolved.parents:
        raise RecipeError(f"{recipe.source_path}: output_dir {recipe.output_dir!r} resolves to {resolved}, "
                          f"outside {root}; give an absolute path if you mean it")
    return raw


def prepare_run_dir(recipe) -> tuple[Path, str | None]:
    """Create the run directory, mark it unfinished, and find the checkpoint to resume from."""
    from alignment.checkpoint import write_atomic
    from alignment.data import data_fingerprint

    run_dir = check_output_dir(recipe)
    resume_from = resume_checkpoint(run_dir, bool(recipe.resume))
    if resume_from:
        check_resume_matches(recipe, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_incomplete(run_dir)
    write_atomic(run_dir / "recipe.yaml", recipe.resolved_yaml())
    fingerprints = {path: data_fingerprint(path) for path in data_files(recipe)}
    write_atomic(run_dir / "data_fingerprints.json", json.dumps(fingerprints, indent=1))
    if not recipe.resume:
        metrics_log = run_dir / "metrics.jsonl"
        if metrics_log.exists():
            metrics_log.unlink()
    return run_dir, resume_from


def precision_defaults() -> dict:
    """fp32 on CPU (bf16 there is 6-400x slower); bf16 on GPUs that support it, else fp16."""
    if not on_gpu():
        return {"bf16": False, "fp16": False, "use_cpu": True}
    import torch

    return {"bf16": torch.cuda.is_bf16_supported(), "fp16": not torch.cuda.is_bf16_supported()}


def trainer_defaults(recipe, run_dir: Path) -> dict:
    """Defaults for any transformers/trl trainer config; the recipe's `train:` keys win."""
    defaults = {
        "output_dir": str(run_dir / CHECKPOINTS),
        "seed": recipe.seed,
        "report_to": "none",
        "gradient_checkpointing": on_gpu(),
        "save_strategy": "steps",
        "save_steps": 200,
        "save_total_limit": 2,
        "logging_steps": 20,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }
    defaults.update(precision_defaults())
    return defaults


def build_trainer_config(recipe, config_class, defaults: dict):
    """The stage's trainer config: defaults, then the recipe's `train:` section; errors name the recipe."""
    values = dict(defaults)
    values.update(dict(recipe.train))
    if not on_gpu():
        # gradient checkpointing only saves memory, and costs a third more compute on CPU.
        values.setdefault("gradient_checkpointing", False)
    try:
        return config_class(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{recipe.source_path}: train: {config_class.__name__} rejected the settings: {exc}") from None


def lora_config(lora_spec, task_type: str = "CAUSAL_LM"):
    """peft LoraConfig for a recipe's `model.lora` (None when full fine-tuning)."""
    if lora_spec is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora_spec.r,
        lora_alpha=lora_spec.alpha,
        lora_dropout=lora_spec.dropout,
        target_modules=lora_spec.target_modules,
        task_type=task_type,
    )


def load_policy(recipe, task: str = "causal_lm"):
    import policies

    spec = recipe.model
    return policies.load(
        spec.name_or_path,
        dtype=spec.dtype,
        seed=recipe.seed,
        task=task,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
        attn_implementation=spec.attn_implementation,
    )


def ensure_loadable_path(model, tokenizer, run_dir: Path) -> None:
    """Give an in-memory model (e.g. `tiny:`) a directory to be reloaded from.

    trl builds some reference models by reloading `model.name_or_path`; a model
    built from a config has none, so save its starting weights into the run.
    """
    if getattr(model, "name_or_path", ""):  # a local directory or a hub id: reloadable as it is
        return
    initial = Path(run_dir) / "initial_model"
    model.save_pretrained(str(initial), safe_serialization=True)
    tokenizer.save_pretrained(str(initial))
    model.name_or_path = str(initial)
    model.config._name_or_path = str(initial)


def metrics_logger(run_dir: Path):
    """A trainer callback that appends every logged dict to run_dir/metrics.jsonl."""
    from transformers import TrainerCallback

    path = Path(run_dir) / "metrics.jsonl"

    class MetricsLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                record = {"step": state.global_step, "time": round(time.time(), 3), **logs}
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record, default=float) + "\n")

    return MetricsLog()


def train(trainer, run_dir: Path, resume_from: str | None, max_seconds: float | None = None) -> None:
    """trainer.train with the shared guards: metrics.jsonl, non-finite gradient skips, clean SIGINT/SIGTERM.

    A signal finishes the step, saves a checkpoint and raises `Interrupted`, so
    the run is never marked complete; `--resume` continues it.
    """
    from alignment.guards import graceful_stop, nonfinite_guard, time_budget

    stopper = graceful_stop()
    for callback in (metrics_logger(run_dir), nonfinite_guard(), stopper):
        trainer.add_callback(callback)
    if max_seconds is not None:
        trainer.add_callback(time_budget(max_seconds))
    trainer.train(resume_from_checkpoint=resume_from)
    stopper.check(run_dir)


def data_files(recipe) -> list[str]:
    files = [recipe.data.train, recipe.data.eval]
    if recipe.eval is not None:
        files.append(recipe.eval.data)
    return [f for f in files if f]


def run_info(recipe) -> dict:
    return base_run_info(recipe, data_files(recipe))


def final_train_loss(trainer) -> float | None:
    """The last logged training loss (averaged by the trainer over its logging interval)."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return float(losses[-1]) if losses else None


def evaluate_policy(model, tokenizer, eval_spec) -> dict | None:
    """Held-out task metrics of a policy: greedy (what a user sees) and sampled accuracy/reward."""
    if eval_spec is None or not eval_spec.data:
        return None
    from alignment.evaluation.quick import policy_task_metrics

    return policy_task_metrics(model, tokenizer, eval_spec)


def summary_line(stage: str, run_dir: Path, metrics: dict, started: float) -> str:
    parts = [f"{stage} done in {time.time() - started:.0f}s", f"checkpoint: {run_dir}"]
    if metrics.get("train_loss") is not None:
        parts.append(f"final loss {metrics['train_loss']:.4f}")
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    if "greedy_accuracy" in after:
        parts.append(f"held-out accuracy {before.get('greedy_accuracy', float('nan')):.1%} -> {after['greedy_accuracy']:.1%}")
    return " | ".join(parts)
