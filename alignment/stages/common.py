"""Steps every stage shares: seeding, run-directory set-up, trainer configs, logging, held-out checks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from alignment.checkpoint import CHECKPOINTS, base_run_info, mark_incomplete, resume_checkpoint
from alignment.errors import DataError, RecipeError, TrainingError
from alignment.recipe import thaw


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
RESUMABLE_CHANGES = {"resume", "overwrite", "output_dir", "max_steps", "num_train_epochs", "save_steps", "logging_steps",
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
    if not recipe.output_dir or "\x00" in recipe.output_dir:
        raise RecipeError(f"{recipe.source_path}: output_dir {recipe.output_dir!r} is not a usable path")
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
    from alignment.checkpoint import (
        drop_partial_checkpoints,
        lock_run_dir,
        refuse_to_replace_a_finished_run,
        remove_stale_staging,
        require_finished_run,
        set_aside_checkpoints,
        write_atomic,
    )
    from alignment.data import data_fingerprint
    from alignment.distributed import is_main_process

    check_machine(recipe)
    run_dir = check_output_dir(recipe)
    require_trackers(recipe)  # a tracker package missing is an error now, not after the model has loaded
    for start in [recipe.model.name_or_path] + [spec["source"] for spec in recipe.reward]:
        require_finished_run(start)  # e.g. DPO from an SFT directory whose run was interrupted
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)  # before anything in the directory changes
        for stale in remove_stale_staging(run_dir):
            print(f"removed {stale}: the staging folder of a save that did not finish", flush=True)
    resume_from = resume_checkpoint(run_dir, bool(recipe.resume))
    if not resume_from:
        refuse_to_replace_a_finished_run(run_dir, recipe.overwrite)
    if resume_from:
        check_resume_matches(recipe, run_dir)
        for partial in drop_partial_checkpoints(run_dir) if is_main_process() else []:
            print(f"ignoring {partial}: half-written (no trainer_state.json), removed; resuming from {resume_from}",
                  flush=True)
    elif is_main_process():
        previous = set_aside_checkpoints(run_dir)
        if previous is not None:
            print(f"fresh start: the earlier run's checkpoints were moved to {previous}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_incomplete(run_dir)
    write_atomic(run_dir / "recipe.yaml", recipe.resolved_yaml())
    fingerprints = {path: data_fingerprint(path) for path in data_files(recipe)}
    write_atomic(run_dir / "data_fingerprints.json", json.dumps(fingerprints, indent=1))
    if not recipe.resume:
        metrics_log = run_dir / "metrics.jsonl"
        if metrics_log.exists():
            metrics_log.unlink(missing_ok=True)
    return run_dir, resume_from


def start_run(recipe) -> tuple[float, Path, str | None]:
    """The opening of every stage: its start time, offline settings, seeds, and the run directory (locked,
    marked unfinished) with the checkpoint to resume from."""
    from alignment.precision import for_recipe

    started = time.time()
    offline_defaults()
    seed_everything(recipe.seed)
    run_dir, resume_from = prepare_run_dir(recipe)
    print(f"[{recipe.stage}] {for_recipe(recipe).line()}", flush=True)  # what was chosen, and why
    return started, run_dir, resume_from


def finish_run(recipe, run_dir: Path, model, tokenizer, metrics: dict, started: float, note: str = "") -> dict:
    """The close of every stage: the model, tokenizer, recipe and metrics saved as a finished run; the metrics
    returned with their one-line summary (`note` appended to it)."""
    from alignment.checkpoint import save_run

    save_run(run_dir, model=model, tokenizer=tokenizer, recipe=recipe, run_info=run_info(recipe), metrics=metrics)
    metrics["summary"] = summary_line(recipe.stage, run_dir, metrics, started) + note
    return metrics


def precision_defaults(recipe) -> dict:
    """trl's precision flags from the recipe's `precision:` (alignment/precision.py chooses; mixed precision:
    fp32 master weights and optimizer state, bf16/fp16 autocast)."""
    from alignment.precision import for_recipe

    return {**for_recipe(recipe).trainer_flags(), **({} if on_gpu() else {"use_cpu": True})}


def checkpointing_key(recipe) -> str:
    """The trainer-config name of activation checkpointing this recipe uses.

    transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing` and warns on the old
    name; a recipe that still says `gradient_checkpointing` keeps it (setting the new name as well would
    silently override the recipe's value).
    """
    return "gradient_checkpointing" if "gradient_checkpointing" in recipe.train else "activation_checkpointing"


def trainer_defaults(recipe, run_dir: Path) -> dict:
    """Defaults for any transformers/trl trainer config; the recipe's `train:` keys win."""
    defaults = {
        "output_dir": str(run_dir / CHECKPOINTS),
        "seed": recipe.seed,
        "report_to": "none",
        checkpointing_key(recipe): on_gpu(),
        "save_strategy": "steps",
        "save_steps": 200,
        "save_total_limit": 2,
        "logging_steps": 20,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }
    defaults.update(precision_defaults(recipe))
    return defaults


def build_trainer_config(recipe, config_class, defaults: dict):
    """The stage's trainer config: defaults, then the recipe's `train:` section; errors name the recipe."""
    values = dict(defaults)
    # thawed: transformers pickles its arguments into every checkpoint, and a frozen mapping cannot be pickled
    values.update(thaw(recipe.train))
    # our metrics writer feeds the trackers (open_metrics_log): trl's own would log its names, not the vocabulary
    values["report_to"] = "none"
    if not on_gpu():
        # gradient checkpointing only saves memory, and costs a third more compute on CPU.
        values.setdefault(checkpointing_key(recipe), False)
    try:
        return config_class(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{recipe.source_path}: train: {config_class.__name__} rejected the settings: {exc}") from None


def trainer_inputs(recipe, model, tokenizer, args, train_dataset, eval_dataset=None,
                   task_type: str = "CAUSAL_LM") -> dict:
    """The keyword arguments every trl trainer takes, fed the same way in every stage (LoRA from model.lora)."""
    return {"model": model, "args": args, "train_dataset": train_dataset, "eval_dataset": eval_dataset,
            "processing_class": tokenizer, "peft_config": lora_config(recipe.model.lora, task_type=task_type)}


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


def check_quantization(recipe) -> None:
    """`model.quantization` on a machine without a CUDA GPU or bitsandbytes: a RecipeError, never a traceback."""
    from policies.load import quantization_problem

    problem = quantization_problem(recipe.model.quantization)
    if problem:
        raise RecipeError(f"{recipe.source_path}: model.quantization: {recipe.model.quantization}: {problem}")


def check_vllm(recipe) -> None:
    """`train.use_vllm` (trl's GRPO/RLOO, our PPO) without a CUDA GPU or the vllm package: refused before anything loads.

    trl would otherwise fail deep inside the trainer's set-up, after the model is loaded.
    """
    if not recipe.train.get("use_vllm"):
        return
    from policies.load import vllm_problem

    problem = vllm_problem()
    if problem:
        raise RecipeError(f"{recipe.source_path}: train.use_vllm: {problem}")


def check_machine(recipe) -> None:
    """Settings this machine cannot run (bitsandbytes, vLLM), refused before the run directory or a model."""
    check_quantization(recipe)
    check_vllm(recipe)


def prepare_quantized(model, recipe):
    """peft's k-bit training set-up, before the LoRA adapter goes on (QLoRA).

    It freezes every base weight, upcasts the norms and the other unquantized weights to fp32
    for stable gradients, and turns on gradient checkpointing (unless `train.gradient_checkpointing:
    false`) with inputs requiring grad, so gradients reach the adapter through checkpointed layers.
    """
    from peft import prepare_model_for_kbit_training

    checkpointing = bool(recipe.train.get(checkpointing_key(recipe), True))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def load_policy(recipe, task: str = "causal_lm"):
    """The recipe's model and tokenizer; quantized and prepared for k-bit training with `model.quantization`."""
    import policies

    spec = recipe.model
    check_quantization(recipe)
    model, tokenizer = policies.load(
        spec.name_or_path,
        dtype=spec.dtype,
        seed=recipe.seed,
        task=task,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
        attn_implementation=spec.attn_implementation,
        quantization=spec.quantization,
    )
    if spec.quantization:
        model = prepare_quantized(model, recipe)
    check_chat_template(recipe, tokenizer)
    return model, tokenizer


def load_tokenizer(recipe):
    """The policy's tokenizer alone: stages check their data with it before loading the (maybe large) model."""
    import policies

    tokenizer = policies.load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    check_chat_template(recipe, tokenizer)
    return tokenizer


def check_chat_template(recipe, tokenizer) -> None:
    """Conversational data needs the tokenizer's chat template: without one it is an error, never a fallback."""
    if getattr(tokenizer, "chat_template", None):
        return
    from alignment import data

    for source in (recipe.data.train, recipe.data.eval):
        if source and data.is_conversational_row(data.first_row(source, recipe.data.split)):
            raise DataError(
                f"{source}: rows are conversations (lists of messages) but the tokenizer of "
                f"{recipe.model.name_or_path} has no chat template to render them; start from a chat model, "
                "give the tokenizer a chat template (tokenizer_config.json / chat_template.jinja), "
                "or write the data as plain strings"
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


def report_to_names(recipe) -> list[str]:
    """The trackers a recipe's `train.report_to` names ([] for none); every stage reads the same key."""
    from alignment.tracking import normalise_report_to

    try:
        return normalise_report_to(recipe.train.get("report_to"))
    except ValueError as exc:
        raise RecipeError(f"{recipe.source_path}: train.report_to: {exc}") from None


def require_trackers(recipe) -> None:
    from alignment.tracking import require_tracker_packages

    names = report_to_names(recipe)
    if names:
        require_tracker_packages(names, where=f"{recipe.source_path}: train.report_to")


def open_metrics_log(recipe, run_dir: Path, enabled: bool | None = None):
    """The run's metrics.jsonl writer, with the recipe's trackers (`train.report_to`) attached.

    Our writer feeds the trackers for every stage, trl's included (trl itself gets report_to="none"), so a
    tracker shows exactly the names and values of metrics.jsonl, the shared vocabulary among them.
    """
    import yaml

    from alignment.distributed import is_main_process
    from alignment.metrics import MetricsLog
    from alignment.recipe import redact

    enabled = is_main_process() if enabled is None else enabled
    names = report_to_names(recipe)
    trackers = None
    if names and enabled:
        from alignment.tracking import Trackers

        config = redact(yaml.safe_load(recipe.resolved_yaml()) or {})
        trackers = Trackers(names, run_dir, config=config, run_name=Path(run_dir).name)
    return MetricsLog(run_dir, trackers, enabled=enabled)


def metrics_logger(metrics_log):
    """A trainer callback that hands every logged dict to `metrics_log` (metrics.jsonl and the trackers)."""
    from transformers import TrainerCallback

    class LogToMetricsLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                metrics_log.write(logs, step=state.global_step)

    return LogToMetricsLog()


def train(trainer, recipe, run_dir: Path, resume_from: str | None, max_seconds: float | None = None,
          metrics_log=None) -> None:
    """trainer.train with the shared guards: metrics.jsonl, non-finite gradient skips, clean SIGINT/SIGTERM.

    A signal finishes the step, saves a checkpoint and raises `Interrupted`, so
    the run is never marked complete; `--resume` continues it.  Without `metrics_log` the run's log (and
    trackers) is opened here and closed when training ends; a caller that logs after training passes its own.
    """
    from alignment.guards import (
        disk_error,
        graceful_stop,
        is_out_of_memory,
        nonfinite_guard,
        out_of_memory_message,
        redact_saved_args,
        time_budget,
    )

    owns_log = metrics_log is None
    metrics_log = open_metrics_log(recipe, run_dir) if owns_log else metrics_log
    if recipe.stage == "sft":
        audit_sft_tokens(trainer, recipe, metrics_log)
    stopper = graceful_stop()
    # the guard first: its on_log adds the skipped-step count that metrics_logger then writes
    for callback in (nonfinite_guard(), metrics_logger(metrics_log), stopper, redact_saved_args()):
        trainer.add_callback(callback)
    if max_seconds is not None:
        trainer.add_callback(time_budget(max_seconds))
    periodic = periodic_eval(trainer, recipe, metrics_log)
    if periodic is not None:
        trainer.add_callback(periodic)
    from alignment.precision import attention_for, for_recipe

    try:
        if finished_checkpoint(trainer, resume_from):
            load_finished_checkpoint(trainer, resume_from)
        else:
            with attention_for(for_recipe(recipe)):  # bf16 on a CPU: attention in fp32 (faster there)
                trainer.train(resume_from_checkpoint=resume_from)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise TrainingError(out_of_memory_message(trainer, exc)) from exc
        failed_write = disk_error(exc, run_dir)
        if failed_write is not None:
            raise failed_write from exc
        raise
    finally:
        if owns_log:
            metrics_log.close()
    stopper.check(run_dir)


def finished_checkpoint(trainer, resume_from: str | None) -> bool:
    """True when the checkpoint already holds train.max_steps steps.

    transformers' loop takes a step before it checks max_steps, so resuming such
    a checkpoint would silently train one step more than the recipe asks.
    """
    max_steps = getattr(trainer.args, "max_steps", -1)
    if not resume_from or not max_steps or max_steps <= 0:
        return False
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return False  # their checkpoints load through the training loop only
    try:
        state = json.loads((Path(resume_from) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return int(state.get("global_step", 0)) >= max_steps


def load_finished_checkpoint(trainer, resume_from: str) -> None:
    """Take the weights and the trainer state of a checkpoint that needs no more training."""
    from transformers.trainer_callback import TrainerState

    print(f"{resume_from} already holds train.max_steps={trainer.args.max_steps} steps: nothing left to train, "
          "loading it", flush=True)
    trainer._load_from_checkpoint(resume_from)
    trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))




def _report_audit(counts: dict, max_length, metrics_log) -> None:
    print(f"sft data: {counts['rows']} rows tokenized; {counts['no_trainable_tokens']} dropped with no token left "
          f"to train on, {counts['truncated']} cut at max_length={max_length}, {counts['no_eos_in_loss']} without "
          "a trained EOS", flush=True)
    metrics_log.write({f"data/{k}": v for k, v in counts.items()}, step=0)


def audit_sft_tokens(trainer, recipe, metrics_log) -> dict:
    """Count, report and police what tokenizing did to the SFT rows, before any step is taken.

    * rows trl dropped because no token was left to train on (a prompt filling max_length);
    * rows cut at max_length;
    * rows whose trained tokens hold no EOS / end-of-turn token (the model would never learn to stop).

    Dropped + cut above data.max_dropped_fraction is an error, and so is any row without a trained
    EOS unless data.allow_missing_eos; the counts go to stdout and metrics.jsonl.
    """
    dataset = trainer.train_dataset
    names = getattr(dataset, "column_names", None) or []
    if "labels" not in names or "input_ids" not in names:
        # the length, zero-label and EOS checks read these columns: without them every check would pass unseen
        raise TrainingError(
            f"the SFT token audit needs the 'input_ids' and 'labels' columns of trl's prepared dataset, which has "
            f"{sorted(names) or 'no named columns'}; this trl version prepares SFT data differently, so the "
            "truncation, zero-trainable-token and trained-EOS checks cannot run. Pin the trl version in "
            "constraints, or update alignment.stages.common.audit_sft_tokens")
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    from policies.tokens import end_token_ids

    ends = end_token_ids(tokenizer, getattr(trainer, "model", None))
    max_length = getattr(trainer.args, "max_length", None)
    kept = len(dataset)
    table_rows = getattr(getattr(dataset, "data", None), "num_rows", kept)
    counts = {"rows": table_rows, "no_trainable_tokens": max(0, table_rows - kept), "truncated": 0,
              "no_eos_in_loss": 0}
    example = None
    for batch in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=1024):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            trained_end = any(label != -100 and label in ends for label in labels)
            if max_length is not None and len(ids) >= max_length and not trained_end:
                counts["truncated"] += 1
            elif not trained_end:
                counts["no_eos_in_loss"] += 1
                if example is None:
                    example = tokenizer.decode(ids)[:160]
    lost = counts["no_trainable_tokens"] + counts["truncated"]
    from alignment.distributed import is_main_process

    if is_main_process():
        _report_audit(counts, max_length, metrics_log)
    limit = recipe.data.max_dropped_fraction
    if counts["rows"] and lost / counts["rows"] > limit:
        raise DataError(
            f"{recipe.data.train}: {lost} of {counts['rows']} rows are too long for max_length={max_length} "
            f"({counts['no_trainable_tokens']} dropped: the prompt fills it; {counts['truncated']} cut before their "
            f"end), more than data.max_dropped_fraction={limit}; raise train.max_length, shorten the data, "
            "or raise the limit")
    if counts["no_eos_in_loss"] and not getattr(recipe.data, "allow_missing_eos", False):
        raise DataError(
            f"{recipe.data.train}: {counts['no_eos_in_loss']} of {counts['rows']} rows have no EOS / end-of-turn "
            f"token among their trained tokens, so the model would never learn to stop (e.g. {example!r}); check "
            "the chat template and the pad token (pad == EOS masks EOS with some collators), or set "
            "data.allow_missing_eos: true if the rows are meant to be continued")
    return counts


def data_files(recipe) -> list[str]:
    files = [recipe.data.train, recipe.data.eval]
    if recipe.eval is not None:
        files.append(recipe.eval.data)
    return [f for f in files if f]


def run_info(recipe) -> dict:
    from alignment.precision import for_recipe

    return {**base_run_info(recipe, data_files(recipe)), "precision": for_recipe(recipe).as_dict()}


def final_train_loss(trainer) -> float | None:
    """The last logged training loss (averaged by the trainer over its logging interval).

    A run shorter than one logging interval has only the trainer's closing `train_loss` (the mean over the run).
    """
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry] or [
        entry["train_loss"] for entry in history if "train_loss" in entry]
    return float(losses[-1]) if losses else None


def evaluate_policy(model, tokenizer, eval_spec) -> dict | None:
    """Held-out task metrics of a policy: greedy (what a user sees) and sampled accuracy/reward."""
    from alignment.distributed import is_main_process

    if eval_spec is None or not eval_spec.data or not is_main_process():
        return None
    from alignment.evaluation.quick import policy_task_metrics

    return policy_task_metrics(model, tokenizer, eval_spec)


@contextlib.contextmanager
def preserved_rng():
    """Run a block without moving any random state training reads: python, numpy, torch CPU and every GPU.

    Evaluating mid-run must not change what the run learns: the next batch order,
    dropout masks and samples are drawn exactly as if the block never ran.
    """
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def during_training_spec(eval_spec):
    """The eval spec of the mid-run check: the same metrics, on `during_max_samples` prompts when set."""
    if eval_spec.during_max_samples is None:
        return eval_spec
    return dataclasses.replace(eval_spec, max_samples=eval_spec.during_max_samples)


def evaluate_during_training(model, tokenizer, eval_spec, step: int, metrics_log) -> dict | None:
    """The quick held-out metrics at `step`, appended to metrics.jsonl as `eval/<metric>` (main process only).

    No gradient, the model's train/eval mode put back, every RNG restored: a run
    with this check trains exactly as the run without it.
    """
    import torch

    from alignment.distributed import is_main_process
    from alignment.evaluation.quick import policy_task_metrics

    if eval_spec is None or not eval_spec.every_steps or not eval_spec.data or not is_main_process():
        return None
    was_training = model.training
    try:
        with preserved_rng(), torch.no_grad():
            metrics = policy_task_metrics(model, tokenizer, during_training_spec(eval_spec))
    finally:
        model.train(was_training)
    metrics_log.write({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    return metrics


def periodic_eval(trainer, recipe, metrics_log):
    """A trainer callback running `evaluate_during_training` every `eval.every_steps` optimizer steps, or None.

    Only the main process generates; with FSDP or ZeRO-3 the weights are sharded
    and a one-process generate would hang the others, so the check is skipped there.
    """
    from transformers import TrainerCallback

    eval_spec = recipe.eval
    if eval_spec is None or not eval_spec.every_steps or not eval_spec.data:
        return None
    if sharded_weights(trainer):
        print("eval.every_steps: skipped (weights sharded by FSDP / ZeRO-3; the end-of-stage check still runs)",
              flush=True)
        return None
    tokenizer = getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    class PeriodicEval(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero and state.global_step % eval_spec.every_steps == 0:
                evaluate_during_training(trainer.model, tokenizer, eval_spec, state.global_step, metrics_log)

    return PeriodicEval()


def sharded_weights(trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where no single process holds the whole model."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(plugin, "deepspeed_plugin", None)
    return bool(plugin is not None and getattr(plugin, "zero_stage", 0) == 3)


def summary_line(stage: str, run_dir: Path, metrics: dict, started: float) -> str:
    parts = [f"{stage} done in {time.time() - started:.0f}s", f"checkpoint: {run_dir}"]
    if metrics.get("train_loss") is not None:
        parts.append(f"final loss {metrics['train_loss']:.4f}")
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    if "greedy_accuracy" in after and "greedy_accuracy" in before:
        parts.append(f"held-out accuracy {before['greedy_accuracy']:.1%} -> {after['greedy_accuracy']:.1%}")
    elif "greedy_accuracy" in after:
        parts.append(f"held-out accuracy {after['greedy_accuracy']:.1%}")
    return " | ".join(parts)
