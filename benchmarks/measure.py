"""What one benchmark run measures, the same way for ours and the peer.

Imports only the standard library at import time (torch inside functions), so
it also runs inside the PPO peer's own virtual environment.

* **Training time**: only the training loop.  For every `transformers.Trainer`
  (trl's trainers, used by our stages and by the peers alike) a callback
  records ``on_train_begin`` -> ``on_train_end``; :func:`instrument_trainers`
  installs it by wrapping ``Trainer.train`` once per process, so our stage code
  runs unchanged.  The PPO trainers (ours and trl 1.12.0's) are timed around
  their ``train()`` call.
* **Train tokens**: non-pad tokens entering the model's backbone in a forward
  pass with gradients on (generation and no-grad log-prob passes are not
  counted): ``attention_mask.sum()`` when a 2-D mask is passed, else the
  tokens that are not the pad token (padding-free batches).
* **Peak resident memory**: ``ru_maxrss`` of the run's own process (and of any
  process it started), read when it ends - each run is a fresh process.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process (and of its finished children), in MiB (Linux: KiB units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def matmul_parameters(model) -> int:
    """Parameters that take part in a matrix multiply per token: every `nn.Linear` weight, counted once.

    The embedding lookup is not a matmul; a tied LM head is (it is an
    `nn.Linear` sharing the embedding's storage, counted once).
    """
    import torch

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            if weight.data_ptr() in seen:
                continue
            seen.add(weight.data_ptr())
            total += weight.numel()
    return total


def backbone(model):
    """The decoder stack a causal LM or sequence classifier calls (``model.model`` for Llama)."""
    inner = getattr(model, "pretrained_model", model)  # value-head wrappers
    inner = getattr(inner, "policy", inner)  # trl 1.12's PolicyAndValueWrapper
    prefix = getattr(inner, "base_model_prefix", "")
    return getattr(inner, prefix, inner) if prefix else inner


class TokenCounter:
    """Counts non-pad tokens of forward passes with gradients on, through a forward pre-hook."""

    def __init__(self, pad_token_id=None):
        self.pad_token_id = pad_token_id
        self.tokens = 0
        self.rows = 0
        self.active = False
        self.handles = []

    def attach(self, model) -> None:
        module = backbone(model)
        self.handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, module, args, kwargs):
        import torch

        if not self.active or not torch.is_grad_enabled():
            return None
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.tokens += int(mask.sum().item())
            self.rows += int(mask.shape[0])
        elif isinstance(ids, torch.Tensor):
            pad = self.pad_token_id
            self.tokens += int(ids.numel() if pad is None else (ids != pad).sum().item())
            self.rows += int(ids.shape[0]) if ids.dim() > 1 else 1
        else:
            embeds = kwargs.get("inputs_embeds")
            if isinstance(embeds, torch.Tensor):
                self.tokens += int(embeds.shape[0] * embeds.shape[1])
        return None


class TrainMeter:
    """One training loop's wall time and train tokens, plus what the trainer was configured with."""

    def __init__(self):
        self.start = None
        self.end = None
        self.counter = TokenCounter()
        self.trainer = None
        self.rss_before_train_mb = None
        self.peak_at_train_end_mb = None

    def begin(self, model=None, pad_token_id=None) -> None:
        if model is not None:
            self.counter.pad_token_id = pad_token_id
            self.counter.attach(model)
        self.rss_before_train_mb = current_rss_mb()
        self.counter.active = True
        self.start = time.perf_counter()

    def finish(self) -> None:
        self.end = time.perf_counter()
        self.peak_at_train_end_mb = peak_rss_mb()  # the training loop's peak, before saving or evaluating
        self.counter.active = False
        self.counter.detach()

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return self.end - self.start


METER = TrainMeter()
_INSTRUMENTED = False


def instrument_trainers(meter: TrainMeter = METER) -> TrainMeter:
    """Wrap ``transformers.Trainer.train`` so the (single) training loop of this process is measured."""
    global _INSTRUMENTED
    if _INSTRUMENTED:
        return meter
    from transformers import Trainer, TrainerCallback

    class _Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
            tokenizer = processing_class or kwargs.get("tokenizer")
            pad = getattr(tokenizer, "pad_token_id", None)
            meter.begin(model, pad)

        def on_train_end(self, args, state, control, **kwargs):
            meter.finish()

    original = Trainer.train

    def train(self, *args, **kwargs):
        meter.trainer = self
        self.add_callback(_Timing())
        return original(self, *args, **kwargs)

    train._benchmark_original = original
    Trainer.train = train
    _INSTRUMENTED = True
    return meter


def uninstrument_trainers() -> None:
    """Undo :func:`instrument_trainers` and reset the meter (tests run several workloads in one process)."""
    global _INSTRUMENTED, METER
    from transformers import Trainer

    original = getattr(Trainer.train, "_benchmark_original", None)
    if original is not None:
        Trainer.train = original
    _INSTRUMENTED = False
    METER.__init__()


def trainer_settings(trainer) -> dict:
    """The settings that decide speed, read from the trainer's own args (what actually ran)."""
    args = trainer.args
    keys = [
        "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "max_length",
        "max_prompt_length", "max_completion_length", "num_generations", "bf16", "fp16", "use_cpu",
        "gradient_checkpointing", "padding_free", "packing", "learning_rate", "lr_scheduler_type", "beta",
        "loss_type", "logging_steps", "save_strategy", "dataloader_num_workers", "torch_compile", "seed",
        "temperature", "steps_per_generation", "num_iterations", "use_liger_kernel",
    ]
    out = {}
    for key in keys:
        if hasattr(args, key):
            value = getattr(args, key)
            out[key] = value if isinstance(value, (int, float, str, bool, type(None), list)) else str(value)
    model = getattr(trainer, "model", None)
    config = getattr(model, "config", None)
    out["attn_implementation"] = getattr(config, "_attn_implementation", None)
    return out


def last_logged(trainer, *keys: str):
    """(key, value) of the last logged value of the first of `keys` that was logged."""
    history = getattr(getattr(trainer, "state", None), "log_history", []) or []
    for key in keys:
        values = [entry[key] for entry in history if key in entry]
        if values:
            return key, float(values[-1])
    return None, None


def environment() -> dict:
    info = {"python": platform.python_version(), "executable": sys.executable}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
    except ImportError:
        pass
    for name in ("transformers", "trl", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def write_result(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def summarise(meter: TrainMeter, *, samples: int | None, matmul_params: int | None, metric=(None, None),
              settings: dict | None = None, extra: dict | None = None) -> dict:
    """The per-run record the harness reads: throughput, memory, metric."""
    seconds = meter.seconds
    tokens = meter.counter.tokens
    result = {
        "train_seconds": seconds,
        "train_tokens": tokens,
        "samples": samples,
        "tokens_per_s": tokens / seconds if seconds and tokens else None,
        "samples_per_s": samples / seconds if seconds and samples else None,
        # the training loop's peak (what the table compares); the whole process's peak includes saving the
        # model and, for DPO, the held-out measurement that loads a second model after the loop
        "peak_rss_mb": meter.peak_at_train_end_mb or peak_rss_mb(),
        "process_peak_rss_mb": peak_rss_mb(),
        "rss_before_train_mb": meter.rss_before_train_mb,
        "matmul_params": matmul_params,
        "metric_name": metric[0],
        "metric": metric[1],
        "settings": settings or {},
        "environment": environment(),
    }
    result.update(extra or {})
    return result
