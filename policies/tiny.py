"""Offline tiny models: a tokenizer trained locally and small Llama / Qwen2 models built from a config.

Nothing here touches a hub, so tests and the default demo run on a machine
without internet. The tokenizer shipped in ``policies/assets/tiny_tokenizer``
was trained by :func:`train_tokenizer` on the demo corpus
(``data/tiny_arith/make_data.py`` rebuilds both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tiny_tokenizer"

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]

# Compact ChatML-style template (no newline after the end-of-turn token, since every extra template token is
# paid on every training example), with tool calls and tool results; it lives in the asset file, one copy, so
# the shipped tokenizer and a retrained one carry the same text.  The {% generation %} markers let trl's
# `assistant_only_loss` find the assistant tokens (the end-of-turn token included, so the model learns to stop).
CHAT_TEMPLATE = (TINY_TOKENIZER_DIR / "chat_template.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class TinyPreset:
    """Shape of a tiny model; `parameters` is the approximate count, for the docs."""

    architecture: str  # "llama" or "qwen2"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    parameters: str


PRESETS: dict[str, TinyPreset] = {
    "1m": TinyPreset("llama", 128, 512, 4, 4, "~1M"),
    "20m": TinyPreset("llama", 512, 1376, 6, 8, "~20M"),
    "qwen-1m": TinyPreset("qwen2", 128, 512, 4, 4, "~1M"),
    "qwen-20m": TinyPreset("qwen2", 512, 1376, 6, 8, "~20M"),
}


def train_tokenizer(texts, vocab_size: int = 320):
    """Train a byte-level BPE tokenizer that keeps every digit a token of its own.

    Single-digit tokens keep arithmetic learnable by a tiny model; the BPE
    merges give short tokens for the fixed phrases of the corpus.  Returns a
    `transformers.PreTrainedTokenizerFast` with pad != eos and a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer):
    """Give a raw `tokenizers.Tokenizer` the special tokens and chat template transformers needs."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    fast.model_max_length = 256
    return fast


def load_tiny_tokenizer():
    """The tokenizer shipped with the package (trained on the demo corpus)."""
    from transformers import AutoTokenizer

    if not (TINY_TOKENIZER_DIR / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{TINY_TOKENIZER_DIR} has no tokenizer.json: run `python data/tiny_arith/make_data.py`"
        )
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))


def tiny_config(preset: str, tokenizer, max_position_embeddings: int = 256):
    """A transformers config for a tiny preset, with the tokenizer's special-token ids."""
    from transformers import LlamaConfig, Qwen2Config

    if preset not in PRESETS:
        raise KeyError(f"unknown tiny preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    shape = PRESETS[preset]
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config_class = LlamaConfig if shape.architecture == "llama" else Qwen2Config
    return config_class(**common)


def build_tiny_model(preset: str, tokenizer, seed: int = 0, model_class=None):
    """Random-init tiny model (seeded, so the same preset and seed give the same weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(preset, tokenizer)
    model_class = model_class or AutoModelForCausalLM
    if getattr(model_class, "__name__", "") == "AutoModelForSequenceClassification":
        config.num_labels = 1
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = model_class.from_config(config)
    generation = getattr(model, "generation_config", None)  # classifiers have none
    if generation is not None:
        generation.pad_token_id = tokenizer.pad_token_id
        generation.eos_token_id = tokenizer.eos_token_id
        generation.bos_token_id = tokenizer.bos_token_id
    return model
