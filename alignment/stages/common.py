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


def prepare_run_dir(recipe) -> tuple[Path, str | None]:
    """Create the run directory, mark it unfinished, and find the checkpoint to resume from."""
    run_dir = Path(recipe.output_dir)
    resume_from = resume_checkpoint(run_dir, recipe.resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_incomplete(run_dir)
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
