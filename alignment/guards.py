"""Run-time guards shared by every trainer: non-finite gradients, and clean stops on SIGINT/SIGTERM.

Both are transformers `TrainerCallback`s, so trl's trainers get them unchanged.
"""

from __future__ import annotations

import math
import signal

from alignment.errors import AlignmentError, TrainingError


class Interrupted(AlignmentError):
    """The run was stopped by a signal after saving a checkpoint; `--resume` continues it."""


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

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.grad is not None]
            if all(torch.isfinite(p.grad).all() for p in params):
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


def graceful_stop():
    """On SIGINT/SIGTERM: finish the current step, save a checkpoint, stop; the stage then raises Interrupted."""
    from transformers import TrainerCallback

    class GracefulStop(TrainerCallback):
        def __init__(self):
            self.signal_name = None
            self.previous = {}

        def _handler(self, signum, frame):
            if self.signal_name is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.signal_name = signal.Signals(signum).name
            print(f"\n{self.signal_name} received: finishing this step and saving a checkpoint "
                  "(send it again to stop at once)", flush=True)

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.previous[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread: leave signals alone
                    pass

        def on_step_end(self, args, state, control, **kwargs):
            if self.signal_name is not None:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = {}

        def check(self, run_dir) -> None:
            """Raise Interrupted (after the trainer saved) if a signal stopped the run."""
            if self.signal_name is not None:
                raise Interrupted(f"stopped by {self.signal_name}; checkpoint saved under {run_dir}/checkpoints; "
                                  "run again with --resume to continue")

    return GracefulStop()


def time_budget(max_seconds: float):
    """Stop training (after saving) once `max_seconds` of training have passed: for equal-time controls."""
    import time

    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if time.time() - self.started >= max_seconds:
                control.should_training_stop = True

    return TimeBudget()
