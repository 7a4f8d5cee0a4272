"""Load a model and its tokenizer from a hub id, a local directory, or ``tiny:<preset>``.

    model, tokenizer = policies.load("tiny:1m")                 # offline, random init, seeded
    model, tokenizer = policies.load("runs/tiny/sft")           # a checkpoint of ours
    model, tokenizer = policies.load("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16")

Safety defaults: safetensors only (a pickle checkpoint is refused unless
``allow_pickle=True``) and ``trust_remote_code`` off unless asked for.
"""

from __future__ import annotations

from pathlib import Path

from alignment.errors import CheckpointError

TINY_PREFIX = "tiny:"
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
        kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if task != "causal_lm":
            kwargs["num_labels"] = 1
        with _remote_code_refused(spec):
            model = model_class.from_pretrained(spec, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer
