"""Which arithmetic a run computes in: the one home of the recipe's top-level `precision:` key.

    precision: auto | fp32 | bf16 | fp16        (default auto; `align run R precision=fp32` overrides it)

bf16 and fp16 are *mixed* precision: the weights and the optimizer state stay fp32 (the master copy the
optimizer updates), the forward and backward matmuls run in half precision under ``torch.autocast``.
fp16 also scales the loss (its 5-bit exponent underflows small gradients); bf16 has fp32's exponent
and needs no scaling.  trl's stages get it as ``bf16=True`` / ``fp16=True`` (transformers builds the
autocast and the scaler); our RL loop (alignment.ppo) gets it as accelerate's ``mixed_precision``, with
every log-probability that enters a ratio or a KL computed in fp32 (see :func:`fp32_logits`).

``auto`` chooses, in :func:`choose` (a pure function of what :func:`detect` finds):

* a CUDA GPU: bf16 where it computes bf16 (Ampere and later), else fp16 with loss scaling;
* a CPU with bf16 units (AMX-BF16 or AVX512-BF16, and oneDNN not capped below them by
  ``ONEDNN_MAX_CPU_ISA``) and a model of at least :data:`CPU_BF16_MIN_PARAMETERS`: bf16;
* any other CPU, or a smaller model: fp32.

Why the size rule: on the 2-core AMD EPYC (AVX512-BF16, no AMX) this project measures on, a 512-2048-512
MLP trains 3.3x faster in bf16 than fp32, but the ~1M-parameter demo model's SFT steps took the same
time either way (80 steps: 16 s and 17 s, 15 s and 13 s, one pair of runs each under load), because its
steps are bound by per-operation overhead, not matmuls; the 20M preset trained 2.0x and 3.1x the samples/s
(two pairs).  A model that gains nothing keeps fp32's numerics, so the demo's published seed study stays
what it measured.  Why the ISA cap matters: with ``ONEDNN_MAX_CPU_ISA=AVX2`` the same machine runs the
bf16 MLP 11x *slower* than fp32 (oneDNN falls back to converting every operand), while
``ATEN_CPU_CAPABILITY=avx2`` alone leaves oneDNN's bf16 kernels in place.  The decision never depends
on a timing, so the same recipe on the same machine always computes the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_MIN_PARAMETERS = 10_000_000
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN ISA levels (ONEDNN_MAX_CPU_ISA) that stop below the bf16 dot-product instructions
ONEDNN_LEVELS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What decides the precision: the device, and on a CPU its bf16 units and the kernel caps in force."""

    device: str  # "cuda" or "cpu"
    cuda_bf16: bool = False
    cpu_bf16_units: tuple[str, ...] = ()  # the CPU's flags among CPU_BF16_FLAGS
    onednn_max_isa: Optional[str] = None  # ONEDNN_MAX_CPU_ISA, when set
    kernel_path: Optional[str] = None  # torch.backends.cpu.get_cpu_capability(): recorded, not decisive

    def usable_cpu_bf16_units(self) -> tuple[str, ...]:
        capped = (self.onednn_max_isa or "").upper() in ONEDNN_LEVELS_WITHOUT_BF16
        return () if capped else self.cpu_bf16_units


@dataclasses.dataclass(frozen=True)
class Choice:
    requested: str
    chosen: str  # "fp32", "bf16" or "fp16"
    device: str
    reason: str
    parameters: Optional[int] = None

    def trainer_flags(self) -> dict:
        """transformers' TrainingArguments flags (trl's configs inherit them)."""
        return {"bf16": self.chosen == "bf16", "fp16": self.chosen == "fp16"}

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for it."""
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.chosen]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return f"precision: {self.chosen} ({'asked' if self.requested != 'auto' else 'auto'}: {self.reason})"


def choose(requested: str, hardware: Hardware, parameters: Optional[int] = None) -> Choice:
    """The precision a run computes in (see the module docstring for the rule and its measurements)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    on_cuda = hardware.device == "cuda"
    units = hardware.usable_cpu_bf16_units()

    def made(chosen: str, reason: str) -> Choice:
        return Choice(requested, chosen, hardware.device, reason, parameters)

    if requested == "fp32":
        return made("fp32", "as the recipe asks")
    if requested == "fp16":
        if not on_cuda:
            raise ValueError("precision fp16 (loss-scaled half precision) needs a CUDA GPU; on a CPU use bf16 or fp32")
        return made("fp16", "as the recipe asks, with loss scaling")
    if requested == "bf16":
        if on_cuda and not hardware.cuda_bf16:
            raise ValueError("precision bf16: this GPU does not compute bf16; use fp16 (loss-scaled) or auto")
        if not on_cuda and not units:
            return made("bf16", "as the recipe asks, though this CPU has no usable bf16 units: expect it slower "
                                "than fp32")
        return made("bf16", "as the recipe asks")
    if on_cuda:
        if hardware.cuda_bf16:
            return made("bf16", "the GPU computes bf16")
        return made("fp16", "the GPU has no bf16: fp16 with loss scaling")
    if not units:
        why = (f"oneDNN is capped at {hardware.onednn_max_isa} (ONEDNN_MAX_CPU_ISA)" if hardware.cpu_bf16_units
               else "this CPU has no bf16 units (AMX-BF16 / AVX512-BF16)")
        return made("fp32", f"{why}: bf16 would be slower than fp32")
    if parameters is not None and parameters < CPU_BF16_MIN_PARAMETERS:
        return made("fp32", f"CPU bf16 units ({', '.join(units)}), but a model of {parameters / 1e6:.1f}M "
                            f"parameters (< {CPU_BF16_MIN_PARAMETERS / 1e6:g}M) is bound by per-operation "
                            "overhead, not matmuls: fp32's numerics at the same speed")
    size = f"{parameters / 1e6:.1f}M parameters" if parameters is not None else "a model of unknown size"
    return made("bf16", f"CPU bf16 units ({', '.join(units)}) and {size}")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect() -> Hardware:
    """The hardware facts :func:`choose` reads, from torch, /proc/cpuinfo and the environment."""
    import torch

    if torch.cuda.is_available():
        return Hardware("cuda", cuda_bf16=torch.cuda.is_bf16_supported())
    flags = cpu_flags()
    return Hardware("cpu", cpu_bf16_units=tuple(f for f in CPU_BF16_FLAGS if f in flags),
                    onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
                    kernel_path=torch.backends.cpu.get_cpu_capability())


def parameter_count(name_or_path: str) -> Optional[int]:
    """The model's parameter count from its config alone (built on the meta device: no weights, no memory);
    None when the config is not on this machine (a hub name not yet downloaded)."""
    import torch

    try:
        if name_or_path.startswith("tiny:"):
            from policies.tiny import load_tiny_tokenizer, tiny_config

            config = tiny_config(name_or_path.split(":", 1)[1], load_tiny_tokenizer())
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)  # a decision never waits on the network
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except (OSError, ValueError, KeyError):
        return None


def for_recipe(recipe) -> Choice:
    """The run's precision: the recipe's `precision:` on this machine, for its model."""
    return choose(recipe.precision, detect(), parameter_count(recipe.model.name_or_path))


@contextlib.contextmanager
def fp32_logits(model):
    """Compute the output layer in fp32 under autocast: the logits feed log-softmax, ratios and KL.

    Why: autocast would run the LM head in bf16 and round every logit to 8 bits of mantissa (an error of
    ~0.03 at a logit of 8), and the same token's log-prob would then differ between the rollout pass and
    the update pass by more than PPO's ratio is meant to measure.  Inside this block the head reads its
    fp32 master weights and an fp32 input; outside it the model is as it was.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    had_own = "forward" in vars(head)  # e.g. a wrapper someone installed before us: put back as it was
    original = head.forward

    def forward(hidden, *args, **kwargs):
        device = hidden.device.type
        with torch.autocast(device_type=device, enabled=False):
            return original(hidden.float(), *args, **kwargs)

    head.forward = forward
    try:
        yield
    finally:
        if had_own:
            head.forward = original
        else:
            del head.forward  # the class's forward again


@contextlib.contextmanager
def cpu_attention_in_fp32():
    """Under CPU bf16 autocast, run transformers' ``sdpa`` attention in fp32 (the projections stay bf16).

    Why: autocast sends ``scaled_dot_product_attention`` to bf16, and torch's CPU flash-attention kernel is
    slower in bf16 than in fp32 (its bf16 backward most of all). Measured on the 2-core AMD EPYC (AVX512-BF16,
    1 thread, under load): one fwd+bwd at SFT's shapes (32 rows x 20 positions, 8 heads of 64) 24 ms in bf16
    vs 4.6 ms with the inputs cast to fp32, and 20 steps of tiny:20m SFT at precision bf16 16.8 / 15.3 s with
    this vs 18.0 / 18.3 s without (attention was 18% of a bf16 step, 6% of an fp32 one). Outside CPU autocast
    (fp32 runs, GPUs) the function is transformers' own.

    Transformers looks the attention function up by name at every forward (``ALL_ATTENTION_FUNCTIONS``), so
    the replacement is this process's ``sdpa`` until the block ends, then the original again.
    """
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had_local, before = "sdpa" in local, local.get("sdpa")
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_fp32_under_cpu_autocast(module, query, key, value, attention_mask, *args, **kwargs):
        if query.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()  # an additive mask must match the fp32 query
        with torch.autocast("cpu", enabled=False):
            return original(module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_fp32_under_cpu_autocast
    try:
        yield
    finally:
        if had_local:
            local["sdpa"] = before
        else:
            local.pop("sdpa", None)


def attention_for(choice: Choice):
    """The attention context a run of ``choice`` trains under: :func:`cpu_attention_in_fp32` for bf16 on a CPU,
    nothing otherwise."""
    if choice.chosen == "bf16" and choice.device == "cpu":
        return cpu_attention_in_fp32()
    return contextlib.nullcontext()
