"""One decoder pass for a prompt that several rows of a batch share.

Two batch layouts repeat a prompt:

* preference pairs (trl's DPO and reward-model collators): ``2B`` right-padded rows, the ``B``
  prompt+chosen rows then the ``B`` prompt+rejected rows, row ``i`` and row
  ``i + B`` starting with the same prompt (:func:`pack_pairs`; the shared
  prefix is found from the tokens);
* groups of completions (trl's GRPO/RLOO): ``N`` rows of a left-padded prompt
  (columns ``< prompt_width``) then a right-padded completion, ``G`` rows per
  prompt, in any order (:func:`pack_groups`; rows with identical prompt columns
  form a group);
* supervised batches (trl's SFT collator): right-padded rows that all start
  with the same tokens, e.g. the chat template's header or a system prompt
  (:func:`pack_common_prefix`; rows are packed ``group_size`` at a time).

In a causal decoder the hidden state at position ``t`` depends on tokens
``0..t`` only, so over a shared prefix every row of a group has the same hidden
states: computing them once per row is waste, and the prompt is usually most
of the sequence (the demo: ~15-20 prompt tokens, 1-6 answer tokens).  Each
group becomes one packed row ``[prefix | tail_1 | ... | tail_k]``; every
tail's position ids continue from the end of the prefix, and
:func:`segment_attention_mask` lets each tail attend to the prefix and to
itself (causally), never to another tail.  The decoder runs once over the
packed rows and :func:`unpack_hidden` gathers the hidden states back into the
caller's layout.  The result equals the unshared forward up to float rounding;
so do the gradients, since autograd sums the gradient of a prefix state over
the rows that read it.  Position ids are the columns the tokens had, as the
unpacked forward numbers them (left pads included).

:func:`install` wraps a decoder's ``forward`` (bound to the instance, so the
module's hooks still see the caller's arguments) and :func:`active` switches
the packing on around code that passes such batches (the DPO loss and
reference passes, GRPO/RLOO log-prob passes).  The layout :func:`active` sets
is a context variable, reset when the ``with`` block ends, and the token
counts live on each installed decoder (:func:`saved_fraction`): nothing is
kept between runs of one process.  Outside :func:`active`, and for
any call the packing does not cover (other padding, an odd batch, cached
decoding, extra inputs), the original forward runs unchanged.

Needs an attention that takes an explicit 4-D mask (``sdpa`` or ``eager``) and
full attention in every layer (:func:`unsupported_reason`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
from dataclasses import dataclass

import torch

# None: off; else the layout of the batches, set only inside `with active(...)` (and reset on leaving it)
_LAYOUT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("shared_prompt_layout", default=None)
_PACKABLE_KWARGS = frozenset({"input_ids", "attention_mask"})


PAD = -1  # the segment id of padding in a packed row


@dataclass
class Packed:
    """``M`` packed rows for ``N`` original rows, and the way back."""

    input_ids: torch.Tensor  # (M, T)
    position_ids: torch.Tensor  # (M, T)
    segment: torch.Tensor  # (M, T): 0 shared prefix, 1..k the tails, PAD padding
    packed_row: torch.Tensor  # (N,): the packed row holding each original row
    source: torch.Tensor  # (N, L): packed position of each original token (0 at padding)
    packed_tokens: int  # non-pad tokens of the packed rows
    original_tokens: int  # non-pad tokens of the original rows


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


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int = 0) -> Packed | None:
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
    segment = torch.full((half, packed_width), PAD, dtype=torch.long, device=device)
    segment = torch.where(j < end, torch.full_like(segment, 2), segment)
    segment = torch.where(j < p + a, torch.full_like(segment, 1), segment)
    segment = torch.where(j < p, torch.zeros_like(segment), segment)
    # Where each packed position reads from in the original rows, and at which position id.
    in_second = segment == 2
    original_position = torch.where(in_second, j - a, j)  # the second tail continues the prefix
    original_row = torch.where(in_second, half + torch.arange(half, device=device).unsqueeze(1),
                               torch.arange(half, device=device).unsqueeze(1))
    is_pad = segment == PAD
    original_position = torch.where(is_pad, torch.zeros_like(original_position), original_position)
    packed_ids = input_ids[original_row, original_position].masked_fill(is_pad, pad_token_id)

    # The way back: row r's token t sits at packed position t (prefix, or the first tail), or t + a (second tail).
    t = torch.arange(width, device=device).unsqueeze(0)
    shift = torch.cat([torch.zeros_like(first_tail), first_tail]).unsqueeze(1)
    prefix_both = torch.cat([prefix, prefix]).unsqueeze(1)
    source = torch.where(t < prefix_both, t, t + shift)
    source = torch.where(t < lengths.unsqueeze(1), source, torch.zeros_like(source))
    return Packed(
        input_ids=packed_ids,
        position_ids=original_position,
        segment=segment,
        packed_row=torch.arange(rows, device=device) % half,
        source=source,
        packed_tokens=int(packed_lengths.sum()),
        original_tokens=int(lengths.sum()),
    )


def pack_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                pad_token_id: int = 0) -> Packed | None:
    """Pack rows with identical prompt columns into ``[prompt | completion_1 | ... | completion_k]``.

    Columns ``< prompt_width`` hold a left-padded prompt, the rest a
    right-padded completion; ``None`` when the mask is not of that form or no
    prompt repeats (nothing to share).
    """
    rows, width = input_ids.shape
    if not 0 < prompt_width < width:
        return None
    prompt_mask, completion_mask = attention_mask[:, :prompt_width], attention_mask[:, prompt_width:]
    prompt_lengths = prompt_mask.sum(dim=1)
    completion_lengths = right_padded_lengths(completion_mask)
    if completion_lengths is None or right_padded_lengths(prompt_mask.flip(1)) is None:
        return None
    keys = input_ids[:, :prompt_width].masked_fill(prompt_mask == 0, -1)
    unique, group_of_row = torch.unique(keys, dim=0, return_inverse=True)
    if unique.shape[0] == rows:
        return None
    members = [[] for _ in range(unique.shape[0])]
    for row, group in enumerate(group_of_row.tolist()):
        members[group].append(row)
    prompt_len, completion_len = prompt_lengths.tolist(), completion_lengths.tolist()
    prefixes = [(prompt_width - prompt_len[m[0]], prompt_len[m[0]]) for m in members]
    tails = {row: (prompt_width, completion_len[row]) for row in range(rows)}
    return _pack_spans(input_ids, members, prefixes, tails, int(attention_mask.sum()), pad_token_id)


def pack_common_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, group_size: int,
                       pad_token_id: int = 0, min_saving: float = 0.1) -> Packed | None:
    """Pack right-padded rows ``group_size`` at a time into ``[common prefix | tail_1 | ... | tail_k]``.

    The prefix is what every row of the batch starts with.  ``None`` when the
    mask is not right padding or packing would save under ``min_saving`` of the
    tokens (the longer packed rows cost attention, so a one-token prefix is not worth it).
    """
    rows, width = input_ids.shape
    lengths = right_padded_lengths(attention_mask)
    if lengths is None or rows < 2 or group_size < 2:
        return None
    shortest = int(lengths.min())
    same = (input_ids[:, :shortest] == input_ids[:1, :shortest]).all(dim=0)
    prefix = int(same.int().argmin()) if not bool(same.all()) else shortest
    groups = [list(range(start, min(start + group_size, rows))) for start in range(0, rows, group_size)]
    original_tokens = int(lengths.sum())
    packed_lengths = [prefix + sum(int(lengths[r]) - prefix for r in g) for g in groups]
    if prefix == 0 or 1 - sum(packed_lengths) / original_tokens < min_saving:
        return None
    tails = {row: (prefix, int(lengths[row]) - prefix) for row in range(rows)}
    return _pack_spans(input_ids, groups, [(0, prefix)] * len(groups), tails, original_tokens, pad_token_id)


def _pack_spans(input_ids: torch.Tensor, groups: list, prefixes: list, tails: dict, original_tokens: int,
                pad_token_id: int) -> Packed:
    """One packed row per group: its prefix span, then each member's tail span, at their original columns.

    ``prefixes[g] = (first column, length)`` in the group's first row (the same tokens in every member);
    ``tails[row] = (first column, length)``.  Position ids are the original columns.
    """
    packed_lengths = [p + sum(tails[r][1] for r in members) for members, (_, p) in zip(groups, prefixes)]
    rows, width = input_ids.shape
    shape = (len(groups), max(packed_lengths))
    ids = torch.full(shape, pad_token_id, dtype=input_ids.dtype)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, PAD, dtype=torch.long)
    source = torch.zeros((rows, width), dtype=torch.long)
    packed_row = torch.zeros(rows, dtype=torch.long)
    cpu_ids = input_ids.cpu()
    for g, (members, (start, p)) in enumerate(zip(groups, prefixes)):
        ids[g, :p] = cpu_ids[members[0], start : start + p]
        positions[g, :p] = torch.arange(start, start + p)
        segment[g, :p] = 0
        at = p
        for k, row in enumerate(members, start=1):
            first, n = tails[row]
            ids[g, at : at + n] = cpu_ids[row, first : first + n]
            positions[g, at : at + n] = torch.arange(first, first + n)
            segment[g, at : at + n] = k
            source[row, start : start + p] = torch.arange(p)
            source[row, first : first + n] = torch.arange(at, at + n)
            packed_row[row] = g
            at += n
    device = input_ids.device
    return Packed(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        segment=segment.to(device),
        packed_row=packed_row.to(device),
        source=source.to(device),
        packed_tokens=sum(packed_lengths),
        original_tokens=original_tokens,
    )


def segment_attention_mask(segment: torch.Tensor, *, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(M, 1, T, T) mask: query q sees key k iff k <= q and k is in the prefix or in q's own tail.

    Boolean (True = attend) by default, as ``sdpa`` takes it; with
    ``additive_dtype`` 0 / dtype-min, as eager attention adds it to the
    scores.  Padding queries see the prefix, and position 0 when there is none,
    so no row is all masked (their outputs are never read).
    """
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    allowed = causal & (key != PAD) & ((key == 0) | (key == query))
    allowed[:, :, 0] |= query.squeeze(2) == PAD
    allowed = allowed.unsqueeze(1)
    if additive_dtype is None:
        return allowed
    blocked = torch.full(allowed.shape, torch.finfo(additive_dtype).min, dtype=additive_dtype, device=segment.device)
    return torch.where(allowed, torch.zeros((), dtype=additive_dtype, device=segment.device), blocked)


def unpack_hidden(hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(M, T, H) packed hidden states -> (N, L, H) in the original rows (padding positions hold junk)."""
    return hidden[packed.packed_row.unsqueeze(1), packed.source]


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
    decoder.shared_prompt_stats = PackingStats()
    return True


def _packed_forward(decoder, *args, **kwargs):
    original = functools.partial(type(decoder).forward, decoder)
    layout = _LAYOUT.get()
    if layout is None:
        return original(*args, **kwargs)
    # a sequence classifier passes input_ids by position and the unused inputs as None
    given = {k: v for k, v in kwargs.items() if v is not None and not (k == "use_cache" and v is False)}
    if len(args) == 1 and "input_ids" not in given:
        given["input_ids"] = args[0]
    elif args:
        return original(*args, **kwargs)
    if not set(given) <= _PACKABLE_KWARGS or given.get("use_cache"):
        return original(*args, **kwargs)
    input_ids, attention_mask = given.get("input_ids"), given.get("attention_mask")
    if input_ids is None or attention_mask is None or attention_mask.dim() != 2:
        return original(*args, **kwargs)
    config = decoder.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    if layout.get("group_size"):
        packed = pack_common_prefix(input_ids, attention_mask, layout["group_size"], pad)
    elif layout.get("prompt_width"):
        packed = pack_groups(input_ids, attention_mask, layout["prompt_width"], pad)
    else:
        packed = pack_pairs(input_ids, attention_mask, pad)
    if packed is None:
        return original(*args, **kwargs)
    additive = decoder.get_input_embeddings().weight.dtype if config._attn_implementation == "eager" else None
    mask = segment_attention_mask(packed.segment, additive_dtype=additive)
    outputs = original(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                       use_cache=False)
    outputs.last_hidden_state = unpack_hidden(outputs.last_hidden_state, packed)
    decoder.shared_prompt_stats.add(packed)
    return outputs


class PackingStats:
    """Tokens one installed decoder ran packed vs would have run unpacked, since :func:`install`."""

    def __init__(self):
        self.packed = 0
        self.original = 0

    def add(self, packed: Packed) -> None:
        self.packed += packed.packed_tokens
        self.original += packed.original_tokens


def saved_fraction(*models) -> float | None:
    """1 - packed / unpacked decoder tokens over the models' installed decoders (0.6 = 60% fewer); None if
    nothing was packed."""
    packed = original = 0
    for model in models:
        stats = getattr(decoder_of(model), "shared_prompt_stats", None) if model is not None else None
        if stats is not None:
            packed, original = packed + stats.packed, original + stats.original
    return None if not original else round(1 - packed / original, 4)


def outcome(installed: bool, *models) -> dict:
    """`share_prompt` and `share_prompt_saved_fraction` for a stage's metrics.json, as they really were.

    Installed but never packed a batch means the trainer never went through the hooked method (e.g. a trl
    version that routes its loss elsewhere): reported as off, with a warning, never as on.
    """
    import warnings

    saved = saved_fraction(*models)
    if installed and saved is None:
        warnings.warn("share_prompt was installed but no batch was packed: this trainer never called the "
                      "hooked method, so every prompt was computed once per row (reported as share_prompt: false)",
                      RuntimeWarning, stacklevel=2)
    return {"share_prompt": installed and saved is not None, "share_prompt_saved_fraction": saved}


@contextlib.contextmanager
def active(prompt_width: int | None = None, group_size: int | None = None):
    """Pack batches in every installed decoder while inside.

    No argument: preference pairs; ``prompt_width``: groups of completions after a left-padded prompt;
    ``group_size``: right-padded rows with a common prefix, packed that many at a time.
    """
    token = _LAYOUT.set({"prompt_width": prompt_width, "group_size": group_size})
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def install_for_recipe(recipe, *models) -> bool:
    """Install the packing on the models as the recipe's ``options.share_prompt`` says; whether it is on.

    auto: on when the model allows it, else off with a printed reason; true: on, or an error naming why
    not; false: off.
    """
    from alignment.errors import RecipeError

    setting = recipe.options["share_prompt"]
    models = [m for m in models if m is not None]
    if setting is False or not models:
        return False
    decoder = decoder_of(models[0])
    reason = "no decoder stack found" if decoder is None else unsupported_reason(decoder.config)
    if reason is None and all(install(m) for m in models):
        return True
    reason = reason or "its decoder forward is already replaced"
    if setting is True:
        raise RecipeError(f"{recipe.source_path}: options.share_prompt: true, but this model cannot share "
                          f"prompts: {reason}; set it to auto or false")
    print(f"[{recipe.stage}] prompt sharing off: {reason}", flush=True)
    return False
