"""Load a model and its tokenizer from a hub id, a local directory, or ``tiny:<preset>``.

    model, tokenizer = policies.load("tiny:1m")                 # offline, random init, seeded
    model, tokenizer = policies.load("runs/tiny/sft")           # a checkpoint of ours
    model, tokenizer = policies.load("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16")

Safety defaults: safetensors only (a pickle checkpoint is refused unless
``allow_pickle=True``) and ``trust_remote_code`` off unless asked for.

``quantization="4bit"`` / ``"8bit"`` loads the weights through bitsandbytes
(QLoRA: train a LoRA adapter on top); it needs a CUDA GPU and the bitsandbytes
package (``pip install -e '.[gpu]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from policies.errors import CheckpointError, RecipeError

TINY_PREFIX = "tiny:"
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("4bit", "8bit")
GPU_EXTRA = "pip install -e '.[gpu]'"


def default_dtype(device: str | None = None):
    """fp32 on CPU (bf16 there is 6-400x slower), bf16 on a GPU that supports it, else fp16."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_dtype(name: str, device: str | None = None):
    import torch

    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def package_available(name: str) -> bool:
    """Whether `name` is installed, without importing it (bitsandbytes and vllm take seconds and touch CUDA)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def vllm_problem() -> str | None:
    """Why vLLM generation (`train.use_vllm`) cannot run here (None when it can), without importing vllm.

    Shared by the recipe check (grpo, rloo, ppo) and our PPO trainer; a GPU is checked first.
    """
    import torch

    if not torch.cuda.is_available():
        return "vLLM generates on CUDA GPUs; this machine has none (set train.use_vllm: false to generate with transformers)"
    if not package_available("vllm"):
        return (f"the vllm package is not installed: {GPU_EXTRA} (or pip install vllm), or set train.use_vllm: false "
                "to generate with transformers")
    return None


def quantization_problem(quantization: str | None) -> str | None:
    """Why bitsandbytes `quantization` cannot run here (None when it can): checked before any weight is read.

    A GPU is checked first: on a machine without one, installing a package would not help.
    """
    import torch

    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        return f"must be null, 4bit or 8bit, got {quantization!r}"
    if not torch.cuda.is_available():
        return ("bitsandbytes quantization runs on CUDA GPUs; this machine has none (remove model.quantization "
                "to train in full precision)")
    if not package_available("bitsandbytes"):
        return f"needs the bitsandbytes package, which is not installed: {GPU_EXTRA} (or pip install bitsandbytes)"
    return None


def bnb_config(quantization: str):
    """transformers' BitsAndBytesConfig for `quantization`.

    4bit is QLoRA's recipe (Dettmers et al. 2023): NF4 weights, the quantization constants quantized again
    (double quantization), matmuls in bf16 where the GPU has it, else fp16; 8bit is LLM.int8().
    """
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def quantized_kwargs(quantization: str, spec: str) -> dict:
    """from_pretrained kwargs of a bitsandbytes load, after refusing what cannot work.

    The weights are placed on this process's GPU by `device_map` (LOCAL_RANK under accelerate):
    a bitsandbytes model cannot be moved with `.to()` after loading.
    """
    problem = quantization_problem(quantization)
    if problem is None and spec.startswith(TINY_PREFIX):
        problem = "tiny: models are built in memory, not loaded; quantize a checkpoint directory or a hub id"
    if problem:
        raise RecipeError(f"model.quantization: {problem}")
    return {"quantization_config": bnb_config(quantization), "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """A directory with only .bin/.pt weights runs arbitrary code on load: refuse it by default."""
    if allow_pickle or not path.is_dir():
        return
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles and not has_safetensors:
        raise CheckpointError(
            f"{path} holds pickle weights ({', '.join(sorted(pickles))}) and no safetensors; "
            "pickle files can run code when loaded. Convert them, or set model.allow_pickle: true "
            "if you trust their source."
        )


class _remote_code_refused:
    """Turn transformers' "contains custom code ... trust_remote_code=True" refusal into a CheckpointError."""

    def __init__(self, spec: str):
        self.spec = spec

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
            raise CheckpointError(
                f"{self.spec} ships its own Python code (auto_map in its config), which runs when loaded; it was "
                "not run. Read it, and set model.trust_remote_code: true in the recipe if you trust it"
            ) from exc
        return False


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer for a model spec; pad is set (to a token other than EOS when possible)."""
    from transformers import AutoTokenizer

    if spec.startswith(TINY_PREFIX):
        from policies.tiny import load_tiny_tokenizer

        return load_tiny_tokenizer()
    with _remote_code_refused(spec):
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # pad == EOS would mask the EOS label and the model would never learn to stop,
        # so prefer a dedicated token the vocabulary already has.
        for candidate in ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]"):
            if candidate in tokenizer.get_vocab():
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load(
    spec: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    seed: int = 0,
    task: str = "causal_lm",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
    quantization: str | None = None,
):
    """Return ``(model, tokenizer)`` for `spec`; `task` is "causal_lm" or "sequence_classification".

    A ``tiny:<preset>`` spec builds a random model from a config (seeded by `seed`);
    loading a causal-LM checkpoint as "sequence_classification" starts a reward model
    or critic from it with a new one-output head.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_class = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    quantized = quantized_kwargs(quantization, spec) if quantization else {}
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    if spec.startswith(TINY_PREFIX):
        from policies.tiny import build_tiny_model

        model = build_tiny_model(spec[len(TINY_PREFIX):], tokenizer, seed=seed, model_class=model_class)
        model = model.to(dtype=torch_dtype)
    else:
        path = Path(spec)
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"{spec} is a file; a model is loaded from a directory or a hub id")
        _refuse_pickle(path, allow_pickle)
        # use_safetensors=None: transformers takes safetensors where they exist and falls back to the pickle
        # only where they do not (False would prefer the pickle even beside safetensors)
        kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code,
                      use_safetensors=None if allow_pickle else True)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if task != "causal_lm":
            kwargs["num_labels"] = 1
        kwargs.update(quantized)
        with _remote_code_refused(spec):
            model = model_class.from_pretrained(spec, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return (model if quantized else model.to(device)), tokenizer
