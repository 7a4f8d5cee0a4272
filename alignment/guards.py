"""Run-time guards shared by every trainer (`alignment.stages.common.train` adds them all).

* non-finite gradients: the step is skipped and counted, K in a row stop the run;
* SIGINT/SIGTERM: finish the step, save, stop (`Interrupted`);
* a time budget;
* secrets: the trainer arguments pickled into each checkpoint are re-saved redacted;
* out of memory and a full disk become errors that say what to change
  (`is_out_of_memory`, `out_of_memory_message`, `disk_error`).

The callbacks are transformers `TrainerCallback`s, so trl's trainers get them unchanged.
"""

from __future__ import annotations

import errno
import math
import signal
import time
from pathlib import Path

from alignment.errors import AlignmentError, CheckpointError, TrainingError

# `align run` / `align pipeline` exit status of a run stopped by a signal after saving a checkpoint: not 0, so
# `align run sft.yaml && align run dpo.yaml` does not start DPO from an unfinished SFT directory, and not 2
# (an error) because `--resume` continues it.  75 is EX_TEMPFAIL of sysexits.h: "try again later".
EXIT_INTERRUPTED = 75


class Interrupted(AlignmentError):
    """The run was stopped by a signal after saving a checkpoint; `--resume` continues it (exit EXIT_INTERRUPTED)."""


def nonfinite_guard(max_consecutive: int = 5):
    """Skip an optimizer step whose gradients hold NaN/inf (counted); stop after `max_consecutive` in a row.

    Gradients are set to None rather than zero: with zero gradients Adam would
    still move every weight by its momentum, while None makes it skip them.
    """
    import torch
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        def __init__(self):
            self.skipped = 0
            self.in_a_row = 0
            self.since_log = 0  # skipped steps since the last logged loss
            self.last_logged_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_logged_step = state.global_step  # a resumed run starts logging from its checkpoint

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.grad is not None]
            # one fused norm over every gradient: NaN/inf anywhere makes it non-finite
            if not params or torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])):
                self.in_a_row = 0
                return
            for p in params:
                p.grad = None
            self.skipped += 1
            self.in_a_row += 1
            self.since_log += 1
            print(f"warning: step {state.global_step + 1}: non-finite gradient, optimizer step skipped "
                  f"({self.skipped} so far)", flush=True)
            if self.in_a_row >= max_consecutive:
                raise TrainingError(f"{self.in_a_row} optimizer steps in a row had non-finite gradients "
                                    f"(step {state.global_step + 1}); lower the learning rate or check the data")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None:
                logs["nonfinite_skipped_steps"] = self.skipped
                if "loss" in logs:
                    # transformers logs the running mean in place of a NaN/inf loss (0.0 when every step of the
                    # interval was one): when no step of the interval had a finite loss, log NaN, never a number
                    if self.since_log and self.since_log >= state.global_step - self.last_logged_step:
                        logs["loss"] = float("nan")
                    self.since_log, self.last_logged_step = 0, state.global_step
                loss = logs.get("loss")
                if isinstance(loss, float) and not math.isfinite(loss):
                    print(f"warning: step {state.global_step}: logged loss is {loss}", flush=True)

    return NonFiniteGuard()


class SignalLatch:
    """While entered, the first SIGINT/SIGTERM is only recorded (`signal_name`); a second one stops at once.

    The training loop polls `signal_name` between steps, so a stop always falls on a step boundary
    where a checkpoint can be saved. The handlers that were installed before are restored on exit.
    """

    def __init__(self, what: str = "step"):
        self.what = what
        self.signal_name: str | None = None
        self.previous: dict = {}

    def _handler(self, signum, frame):
        if self.signal_name is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this {self.what} and saving a checkpoint "
              "(send it again to stop at once)", flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def check(self, run_dir) -> None:
        """Raise Interrupted (once the checkpoint is saved) if a signal stopped the run."""
        if self.signal_name is not None:
            raise Interrupted(f"stopped by {self.signal_name}; checkpoint saved under {run_dir}/checkpoints; "
                              "run again with --resume to continue")


def graceful_stop():
    """On SIGINT/SIGTERM: finish the current step, save a checkpoint, stop; the stage then raises Interrupted."""
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self):
            self.latch = SignalLatch()

        @property
        def signal_name(self):
            return self.latch.signal_name

        def on_train_begin(self, args, state, control, **kwargs):
            self.latch.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.latch.signal_name is not None:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            self.latch.__exit__()

        def check(self, run_dir) -> None:
            self.latch.check(run_dir)

    return GracefulStop()


class TimeBudget:
    """`max_seconds` of training from `start()` (None: no limit): the one clock of every loop's time budget,
    trl's (through :func:`time_budget`) and ours (stages/ppo.py's train)."""

    def __init__(self, max_seconds: float | None):
        self.max_seconds = max_seconds
        self.start()

    def start(self) -> None:

        self.started = time.time()

    def exhausted(self) -> bool:

        return self.max_seconds is not None and time.time() - self.started >= self.max_seconds


def time_budget(max_seconds: float):
    """Stop training (after saving) once `max_seconds` of training have passed: for equal-time controls."""

    from transformers import TrainerCallback

    budget = TimeBudget(max_seconds)

    class StopWhenOutOfTime(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            budget.start()

        def on_step_end(self, args, state, control, **kwargs):
            if budget.exhausted():
                control.should_training_stop = True

    return StopWhenOutOfTime()


# Default RL health bounds (PPO's train.*, GRPO/RLOO's options.*; null turns one off).  Each sits far from a
# healthy run and is crossed by a collapsed one: a policy that samples one token has an entropy of ~0 nats
# (0.01 means the top token holds ~99.9% at every position); one that never stops has an EOS rate of 0; and
# KL explodes past 1 nat per token (trl's `kl`) or 50 nats per sequence (PPO's `objective/kl`, summed).
DEFAULT_MIN_ENTROPY = 0.01
DEFAULT_MIN_EOS_RATE = 0.01
DEFAULT_MAX_KL_PER_TOKEN = 1.0
DEFAULT_MAX_KL_PER_SEQUENCE = 50.0


def health_problems(metrics: dict, bounds: list[tuple[str, float | None, str]]) -> list[str]:
    """The broken health bounds: each bound is (metric name, value or None = off, "max" | "min").

    A metric absent from `metrics` is not checked (trl logs KL only when its beta is non-zero).
    """
    problems = []
    for name, bound, kind in bounds:
        value = metrics.get(name)
        if bound is None or not isinstance(value, (int, float)):
            continue
        if (kind == "max" and value > bound) or (kind == "min" and value < bound):
            problems.append(f"{name} = {value:.4g} is {'above' if kind == 'max' else 'below'} {bound}")
    return problems


def rl_health_guard(bounds: list[tuple[str, float | None, str]], action: str = "warn"):
    """Check trl's logged RL metrics (KL, entropy, EOS rate) against `bounds` at every log.

    "warn" prints and warns; "stop" saves a checkpoint and stops training, and `check()` then raises
    TrainingError (the stage calls it after training, so the checkpoint is kept, never lost).
    EOS rate is read as 1 - completions/clipped_ratio (the share of completions that did not end).
    """
    import warnings

    from transformers import TrainerCallback

    class RLHealthGuard(TrainerCallback):
        def __init__(self):
            self.stopped_by = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "completions/clipped_ratio" not in logs and "kl" not in logs and "entropy" not in logs:
                return
            values = dict(logs)
            if "completions/clipped_ratio" in logs:
                values["eos_rate"] = 1.0 - logs["completions/clipped_ratio"]
            problems = health_problems(values, bounds)
            if not problems:
                return
            message = f"step {state.global_step}: " + "; ".join(problems)
            if action == "stop":
                self.stopped_by = message
                control.should_save = True
                control.should_training_stop = True
            print(f"warning: RL health: {message}", flush=True)
            warnings.warn(f"RL health: {message}", RuntimeWarning, stacklevel=2)

        def check(self, run_dir) -> None:
            if self.stopped_by is not None:
                raise TrainingError(f"RL health stopped the run at {self.stopped_by}; the checkpoint is kept under "
                                    f"{run_dir}/checkpoints (options.warn_or_stop: warn only warns)")

    return RLHealthGuard()


def redact_saved_args():
    """transformers pickles its arguments (hub_token included) into each checkpoint: re-save them redacted."""
    import copy
    import dataclasses

    from transformers import TrainerCallback

    from alignment.recipe import is_secret_key

    class RedactSavedArgs(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            secrets = [f.name for f in dataclasses.fields(args)
                       if is_secret_key(f.name) and isinstance(getattr(args, f.name, None), str) and getattr(args, f.name)]
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin"
            if not secrets or not saved.is_file() or not state.is_world_process_zero:
                return
            import torch

            clean = copy.copy(args)
            for name in secrets:
                setattr(clean, name, None)
            torch.save(clean, saved)

    return RedactSavedArgs()


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeError some backends raise ("... out of memory ...")."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def out_of_memory_message(trainer, exc: BaseException) -> str:
    """Name the settings that decide memory: batch size, accumulation and sequence length."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    args = trainer.args
    batch = getattr(args, "per_device_train_batch_size", None)
    accumulation = getattr(args, "gradient_accumulation_steps", None)
    lengths = [f"{name}={getattr(args, name)}" for name in ("max_length", "max_prompt_length", "max_completion_length")
               if getattr(args, name, None) is not None]
    step = getattr(getattr(trainer, "state", None), "global_step", 0) + 1
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"out of memory at training step {step} with per_device_train_batch_size={batch}, "
            f"gradient_accumulation_steps={accumulation}, {', '.join(lengths) or 'max_length=None (no limit)'}. "
            f"Lower train.per_device_train_batch_size (raising train.gradient_accumulation_steps keeps the "
            f"effective batch of {batch * accumulation if batch and accumulation else '?'}) or lower the sequence "
            f"length; train.activation_checkpointing=true also saves memory. ({first_line})")


def out_of_memory_error(where: str, settings: dict, advice: str, exc: BaseException) -> TrainingError:
    """The same clear out-of-memory error for loops that are not a trl trainer (our PPO, evaluation).

    where: "PPO step 3"; settings: the values that decide memory, by recipe key; advice: what to lower.
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    shown = ", ".join(f"{key}={value}" for key, value in settings.items())
    return TrainingError(f"out of memory at {where} with {shown}. {advice} ({first_line})")


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_error(exc: BaseException, run_dir: Path) -> Exception | None:
    """A failed write while training (a checkpoint save): keep the last whole checkpoint, drop the partial one
    and the staging folders.  None when `exc` is not a failed write (see checkpoint.write_failure_reason)."""
    from alignment.checkpoint import (
        drop_partial_checkpoints,
        latest_checkpoint,
        remove_stale_staging,
        write_failure_reason,
    )

    if isinstance(exc, OSError) and exc.errno not in DISK_FULL:
        return None  # e.g. a data file that cannot be read: not a failed checkpoint write
    reason = write_failure_reason(exc)
    if reason is None:
        return None
    dropped = drop_partial_checkpoints(run_dir) + remove_stale_staging(run_dir)
    kept = latest_checkpoint(run_dir)
    return CheckpointError(
        f"writing under {run_dir} failed: {reason}. "
        + (f"The half-written {', '.join(p.name for p in dropped)} was removed; " if dropped else "")
        + (f"the last complete checkpoint {kept} is kept; " if kept else "no complete checkpoint exists yet; ")
        + "the run is not marked complete. Free some space and run again"
        + (" with resume=true" if kept else "")
    )
