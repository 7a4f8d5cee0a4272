"""One decoder pass for the prompt a chosen and a rejected answer share.

A preference batch, as trl's DPO collator builds it, holds ``2B`` right-padded
rows: the ``B`` prompt+chosen rows, then the ``B`` prompt+rejected rows, row
``i`` and row ``i + B`` starting with the same prompt.  In a causal decoder the
hidden state at position ``t`` depends on tokens ``0..t`` only, so over the
prefix the two rows share, both rows have the same hidden states: computing
them twice is waste, and the prompt is usually most of the sequence (the demo:
~15 prompt tokens, ~4 answer tokens).

:func:`pack_pairs` packs each pair into one row ``[prefix | chosen tail |
rejected tail]``; the rejected tail's position ids restart where the prefix
ends, and :func:`pair_attention_mask` lets each tail attend to the prefix and
to itself (causally), never to the other tail.  The decoder runs once over the
``B`` packed rows and :func:`unpack_hidden` gathers the hidden states back into
the ``2B``-row layout the caller expects.  The result equals the unshared
forward up to float rounding; so do the gradients, since autograd sums the
gradient of a prefix state over the two rows that read it.

:func:`install` wraps a decoder's ``forward`` (the instance attribute, so the
module's hooks still see the caller's arguments) and :func:`active` switches
the packing on around code that passes pair batches (the DPO trainer's loss and
reference passes).  Outside :func:`active`, and for any call the packing does
not cover (left padding, an odd batch, cached decoding, extra inputs), the
original forward runs unchanged.

Needs an attention that takes an explicit 4-D mask (``sdpa`` or ``eager``) and
full attention in every layer (:func:`unsupported_reason`).
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass

import torch

_ACTIVE = False
_PACKABLE_KWARGS = {"input_ids", "attention_mask", "use_cache"}


@dataclass
class PackedPairs:
    """``B`` packed rows for ``2B`` pair rows, and the way back."""

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    segment: torch.Tensor  # (B, T): 0 prefix, 1 chosen tail, 2 rejected tail, 3 padding
    source: torch.Tensor  # (2B, L): packed position of each original token (0 at padding)
    packed_tokens: int  # non-pad tokens of the packed rows
    original_tokens: int  # non-pad tokens of the 2B rows


def right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Row lengths when every row is ones then zeros; ``None`` for any other mask (left padding, holes)."""
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    expected = (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(attention_mask.dtype)
    return lengths if torch.equal(attention_mask, expected) else None


def shared_prefix_lengths(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """p_i = the longest common prefix of rows i and i+B (over their real tokens), for i < B."""
    half = input_ids.shape[0] // 2
    first, second = input_ids[:half], input_ids[half:]
    width = torch.minimum(lengths[:half], lengths[half:])
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    differs = (first != second) | (positions >= width.unsqueeze(1))
    # the first position where they differ (or one row ends); the whole width when neither happens
    return torch.where(differs.any(dim=1), differs.int().argmax(dim=1), width)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int = 0) -> PackedPairs | None:
    """Pack rows (i, i+B) into ``[prefix | tail_i | tail_{i+B}]``; ``None`` if the batch is not right-padded pairs."""
    rows, width = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    lengths = right_padded_lengths(attention_mask)
    if lengths is None:
        return None
    half = rows // 2
    prefix = shared_prefix_lengths(input_ids, lengths)
    first_tail, second_tail = lengths[:half] - prefix, lengths[half:] - prefix
    packed_lengths = prefix + first_tail + second_tail
    packed_width = int(packed_lengths.max())
    device = input_ids.device

    # The packed row of pair i, position j: prefix (j < p), first tail (p <= j < p + a), second tail, padding.
    j = torch.arange(packed_width, device=device).unsqueeze(0)
    p, a = prefix.unsqueeze(1), first_tail.unsqueeze(1)
    end = packed_lengths.unsqueeze(1)
    segment = torch.full((half, packed_width), 3, dtype=torch.long, device=device)
    segment = torch.where(j < end, torch.full_like(segment, 2), segment)
    segment = torch.where(j < p + a, torch.full_like(segment, 1), segment)
    segment = torch.where(j < p, torch.zeros_like(segment), segment)
    # Where each packed position reads from in the original rows, and at which position id.
    in_second = segment == 2
    original_position = torch.where(in_second, j - a, j)  # the second tail continues the prefix
    original_row = torch.where(in_second, half + torch.arange(half, device=device).unsqueeze(1),
                               torch.arange(half, device=device).unsqueeze(1))
    is_pad = segment == 3
    original_position = torch.where(is_pad, torch.zeros_like(original_position), original_position)
    packed_ids = input_ids[original_row, original_position].masked_fill(is_pad, pad_token_id)

    # The way back: row r's token t sits at packed position t (prefix, or the first tail), or t + a (second tail).
    t = torch.arange(width, device=device).unsqueeze(0)
    shift = torch.cat([torch.zeros_like(first_tail), first_tail]).unsqueeze(1)
    prefix_both = torch.cat([prefix, prefix]).unsqueeze(1)
    source = torch.where(t < prefix_both, t, t + shift)
    source = torch.where(t < lengths.unsqueeze(1), source, torch.zeros_like(source))
    return PackedPairs(
        input_ids=packed_ids,
        position_ids=original_position,
        segment=segment,
        source=source,
        packed_tokens=int(packed_lengths.sum()),
        original_tokens=int(lengths.sum()),
    )


def pair_attention_mask(segment: torch.Tensor, *, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1, T, T) mask: query q sees key k iff k <= q and k is in the prefix or in q's own tail.

    Boolean (True = attend) by default, as ``sdpa`` takes it; with
    ``additive_dtype`` 0 / dtype-min, as eager attention adds it to the
    scores.  Padding queries see the prefix, and position 0 when there is none,
    so no row is all masked (their outputs are never read).
    """
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    allowed = causal & (key != 3) & ((key == 0) | (key == query))
    allowed[:, :, 0] |= query.squeeze(2) == 3
    allowed = allowed.unsqueeze(1)
    if additive_dtype is None:
        return allowed
    blocked = torch.full(allowed.shape, torch.finfo(additive_dtype).min, dtype=additive_dtype, device=segment.device)
    return torch.where(allowed, torch.zeros((), dtype=additive_dtype, device=segment.device), blocked)


def unpack_hidden(hidden: torch.Tensor, packed: PackedPairs) -> torch.Tensor:
    """(B, T, H) packed hidden states -> (2B, L, H) in the original rows (padding positions hold junk)."""
    half = hidden.shape[0]
    pair = torch.arange(2 * half, device=hidden.device) % half
    return hidden[pair.unsqueeze(1), packed.source]


def unsupported_reason(config) -> str | None:
    """Why a model cannot run packed pairs, or ``None`` when it can."""
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} takes no explicit 4-D mask (sdpa and eager do)"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return "the model has layers that are not full attention (sliding window or other)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    if getattr(config, "output_router_logits", False):
        return "mixture-of-experts router losses count tokens per row"
    return None


def decoder_of(model):
    """The decoder stack (``model.model`` for Llama/Qwen) of a causal LM or classifier, through PEFT."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(inner, "base_model_prefix", "")
    return getattr(inner, prefix, None) if prefix else None


def install(model) -> bool:
    """Make ``model``'s decoder pack pair batches inside :func:`active`; False if it cannot.

    The packing forward is bound to the decoder as a method, so a deep copy of
    the model (a frozen reference) gets one bound to the copy.  A decoder whose
    ``forward`` someone else already replaced (e.g. accelerate's offloading
    hooks) is left alone.
    """
    decoder = decoder_of(model)
    if decoder is None or unsupported_reason(decoder.config) is not None:
        return False
    current = decoder.__dict__.get("forward")
    if current is not None:
        return getattr(current, "__func__", None) is _packed_forward
    decoder.forward = types.MethodType(_packed_forward, decoder)
    return True


def _packed_forward(decoder, *args, **kwargs):
    original = functools.partial(type(decoder).forward, decoder)
    if not _ACTIVE or args or not set(kwargs) <= _PACKABLE_KWARGS or kwargs.get("use_cache"):
        return original(*args, **kwargs)
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    if input_ids is None or attention_mask is None or attention_mask.dim() != 2:
        return original(*args, **kwargs)
    config = decoder.config
    packed = pack_pairs(input_ids, attention_mask, config.pad_token_id if config.pad_token_id is not None else 0)
    if packed is None:
        return original(*args, **kwargs)
    additive = decoder.get_input_embeddings().weight.dtype if config._attn_implementation == "eager" else None
    mask = pair_attention_mask(packed.segment, additive_dtype=additive)
    outputs = original(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                       use_cache=False)
    outputs.last_hidden_state = unpack_hidden(outputs.last_hidden_state, packed)
    STATS.add(packed)
    return outputs


class _Stats:
    """Tokens the decoder ran packed vs would have run unpacked, since the last reset."""

    def __init__(self):
        self.packed = 0
        self.original = 0

    def reset(self) -> None:
        self.packed = self.original = 0

    def add(self, packed: PackedPairs) -> None:
        self.packed += packed.packed_tokens
        self.original += packed.original_tokens

    def saved_fraction(self) -> float | None:
        return None if not self.original else round(1 - self.packed / self.original, 4)


STATS = _Stats()


@contextlib.contextmanager
def active():
    """Pack pair batches in every installed decoder while inside."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, True
    try:
        yield
    finally:
        _ACTIVE = previous
