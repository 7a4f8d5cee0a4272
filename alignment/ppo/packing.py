"""Packed update passes: each micro-batch's sequences laid end to end in rows, no padding to the longest.

A padded micro-batch of ``B`` rows costs ``B x (Q + R)`` token positions (``Q`` the longest prompt, ``R``
the longest response) however short most sequences are. Packing places each sequence's real tokens
(prompt, then response up to its EOS) one after another into rows of at most ``Q + R`` positions
(first fit, longest first), with position ids restarting at 0 for each sequence and a block-diagonal
causal mask (:func:`alignment.shared_prompt.segment_attention_mask` with no shared prefix): a token sees
the earlier tokens of its own sequence only, exactly as in the padded pass. So the logits of every
response token, and with them the loss and its gradients, equal the padded pass's up to float rounding
(tests/ppo/test_packing.py). No row is longer than the padded one, so attention never costs more.

Needs an attention that takes an explicit 4-D mask (``sdpa`` or ``eager``) and full attention in every
layer (:func:`alignment.shared_prompt.unsupported_reason`); otherwise the padded pass runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignment.ppo.rollout import response_forward
from alignment.shared_prompt import segment_attention_mask, unsupported_reason
from policies.value import CausalLMWithValueHead, ValueHeadOutput

__all__ = ["GroupBatch", "PackedBatch", "first_fit_bins", "pack_prompt_groups", "pack_sequences", "packed_response_forward",
           "prompt_groups", "shared_prompt_forward"]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (M, W)
    position_ids: torch.Tensor  # (M, W)
    segment: torch.Tensor  # (M, W): 1..k the sequences of the row, -1 padding
    row: torch.Tensor  # (B,): the packed row of each sequence
    logit_index: torch.Tensor  # (B, R): packed position whose logits predict response token t (0 past the end)
    packed_positions: int  # M x W
    padded_positions: int  # B x (Q + R)


def first_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= ``capacity``: first fit, longest first (a classic
    bin-packing heuristic); order inside a bin is by decreasing length."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_sequences(query_ids, query_mask, response_ids, response_mask, pad_token_id: int) -> PackedBatch:
    """Lay each (left-padded prompt, right-padded response) pair's real tokens end to end in rows."""
    batch, q_width = query_ids.shape
    r_width = response_ids.shape[1]
    q_len = query_mask.long().sum(dim=1).tolist()
    r_len = response_mask.long().sum(dim=1).tolist()
    capacity = q_width + r_width
    bins = first_fit_bins([q + r for q, r in zip(q_len, r_len)], capacity)
    width = max(sum(q_len[i] + r_len[i] for i in members) for members in bins)
    ids = torch.full((len(bins), width), pad_token_id, dtype=query_ids.dtype)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    segment = torch.full((len(bins), width), -1, dtype=torch.long)
    row = torch.zeros(batch, dtype=torch.long)
    logit_index = torch.zeros((batch, r_width), dtype=torch.long)
    q_cpu, r_cpu = query_ids.cpu(), response_ids.cpu()
    for b, members in enumerate(bins):
        at = 0
        for k, i in enumerate(members, start=1):
            q, r = q_len[i], r_len[i]
            tokens = torch.cat([q_cpu[i, q_width - q:], r_cpu[i, :r]])
            ids[b, at : at + q + r] = tokens
            positions[b, at : at + q + r] = torch.arange(q + r)
            segment[b, at : at + q + r] = k
            row[i] = b
            # response token t is predicted by the logits at the position before it
            logit_index[i, :r] = torch.arange(at + q - 1, at + q - 1 + r)
            at += q + r
    device = query_ids.device
    return PackedBatch(ids.to(device), positions.to(device), segment.to(device), row.to(device),
                       logit_index.to(device), len(bins) * width, batch * capacity)


def _config(model):
    inner = model.pretrained_model if isinstance(model, CausalLMWithValueHead) else model
    inner = getattr(inner, "module", inner)  # DDP
    return inner.config


def packed_response_forward(model, query_ids, query_mask, response_ids, response_mask):
    """:func:`alignment.ppo.rollout.response_forward` on packed rows: ``(logits (B, R, V), values (B, R) | None)``.

    Falls back to the padded pass when the model's attention cannot take the block-diagonal mask, or a
    prompt has no real token (the position before the first response token would not exist).
    """
    config = _config(model)
    if unsupported_reason(config) is not None or bool((query_mask.long().sum(dim=1) == 0).any()):
        return response_forward(model, query_ids, query_mask, response_ids, response_mask)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    packed = pack_sequences(query_ids, query_mask, response_ids, response_mask, pad)
    dtype = next(model.parameters()).dtype
    additive = dtype if getattr(config, "_attn_implementation", None) == "eager" else None
    mask = segment_attention_mask(packed.segment, additive_dtype=additive)
    out = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False)
    valid = response_mask.bool()
    rows = packed.row.unsqueeze(1).expand_as(packed.logit_index)
    logits = out.logits[rows, packed.logit_index]
    logits = torch.where(valid.unsqueeze(-1), logits, torch.zeros_like(logits))  # past the EOS: no gradient
    values = None
    if isinstance(out, ValueHeadOutput):
        values = torch.where(valid, out.values[rows, packed.logit_index], torch.zeros_like(valid, dtype=out.values.dtype))
    return logits, values


# ------------------------------------------------------------------ one prompt pass per group of samples


def prompt_groups(query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with the same prompt (the same real tokens at the same columns of a left-padded batch).

    Returns ``(first, group)``: ``first[g]`` the first row of group ``g`` (groups numbered in the order
    their first row appears) and ``group[i]`` the group of row ``i``, so ``query_ids[first][group]``
    equals ``query_ids`` on every real token.
    """
    keys = query_ids.masked_fill(query_mask == 0, -1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    seen: dict[int, int] = {}
    group = [seen.setdefault(key, len(seen)) for key in inverse.tolist()]
    first = [0] * len(seen)
    for row in reversed(range(len(group))):
        first[group[row]] = row
    device = query_ids.device
    return torch.tensor(first, dtype=torch.long, device=device), torch.tensor(group, dtype=torch.long, device=device)


@dataclass
class GroupBatch:
    """One packed row ``[prompt | response_1 | ... | response_k]`` per group of rows sharing a prompt."""

    input_ids: torch.Tensor  # (M, W)
    position_ids: torch.Tensor  # (M, W)
    segment: torch.Tensor  # (M, W): 0 the prompt, 1..k the responses of the group, -1 padding
    row: torch.Tensor  # (B,): the packed row of each sequence
    logit_index: torch.Tensor  # (B, R): packed position whose logits predict response token t (0 past the end)
    packed_tokens: int  # real tokens in the packed rows: sum_g (q_g + sum_{i in g} r_i)
    original_tokens: int  # real tokens of the unpacked rows: sum_i (q_i + r_i)


def pack_prompt_groups(query_ids, query_mask, response_ids, response_mask, pad_token_id: int) -> GroupBatch | None:
    """Pack each group of rows with one prompt into ``[prompt | response_1 | ... | response_k]``.

    Position ids are what the unpacked pass gives (:func:`alignment.ppo.rollout.position_ids_from_mask`):
    the prompt's real tokens ``0..q-1``, each response's tokens ``q..q+r_i-1``, so with
    :func:`alignment.shared_prompt.segment_attention_mask` (a response sees the prompt and its own earlier
    tokens) every response token has the hidden state of the unpacked pass. Response token ``t`` of row
    ``i`` is predicted at packed position ``q - 1`` for ``t = 0`` (the prompt's last token, shared by the
    group) and ``a_i + t - 1`` for ``t >= 1``, ``a_i`` the first packed position of response ``i``.

    ``None`` when no prompt repeats (nothing to share: the caller's pass is as cheap) or a prompt has
    no real token (there is no position before the first response token).
    """
    q_len = query_mask.long().sum(dim=1)
    if bool((q_len == 0).any()):
        return None
    first, group = prompt_groups(query_ids, query_mask)
    if len(first) == len(group):
        return None
    batch, q_width = query_ids.shape
    r_width = response_ids.shape[1]
    q_len, r_len = q_len.tolist(), response_mask.long().sum(dim=1).tolist()
    members = [[] for _ in range(len(first))]
    for i, g in enumerate(group.tolist()):
        members[g].append(i)
    lengths = [q_len[m[0]] + sum(r_len[i] for i in m) for m in members]
    shape = (len(members), max(lengths))
    ids = torch.full(shape, pad_token_id, dtype=query_ids.dtype)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    logit_index = torch.zeros((batch, r_width), dtype=torch.long)
    q_cpu, r_cpu = query_ids.cpu(), response_ids.cpu()
    for g, rows in enumerate(members):
        q = q_len[rows[0]]
        ids[g, :q] = q_cpu[rows[0], q_width - q:]
        positions[g, :q] = torch.arange(q)
        segment[g, :q] = 0
        at = q
        for k, i in enumerate(rows, start=1):
            r = r_len[i]
            ids[g, at : at + r] = r_cpu[i, :r]
            positions[g, at : at + r] = torch.arange(q, q + r)
            segment[g, at : at + r] = k
            if r:
                logit_index[i, 0] = q - 1
                logit_index[i, 1:r] = torch.arange(at, at + r - 1)
            at += r
    device = query_ids.device
    return GroupBatch(ids.to(device), positions.to(device), segment.to(device), group, logit_index.to(device),
                      sum(lengths), sum(q_len) + sum(r_len))


def shared_prompt_forward(model, query_ids, query_mask, response_ids, response_mask):
    """:func:`alignment.ppo.rollout.response_forward` with each group's prompt computed once.

    Returns ``(logits (B, R, V), None)``, zero past each response's end, or ``None`` when this model or
    batch cannot take it (then run the padded pass): a model with a value head (its values would need
    the same gathering), an attention without explicit 4-D masks or with non-full layers
    (:func:`alignment.shared_prompt.unsupported_reason`), no repeated prompt.

    The model is called as a whole (through DDP and peft wrappers, its own logit scaling), with
    ``logits_to_keep`` covering the packed positions from the earliest prompt end on: the vocabulary
    projection skips the prompt tokens, which predict no response token.
    """
    if isinstance(model, CausalLMWithValueHead) or isinstance(getattr(model, "module", None), CausalLMWithValueHead):
        return None
    config = _config(model)
    if unsupported_reason(config) is not None:
        return None
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    packed = pack_prompt_groups(query_ids, query_mask, response_ids, response_mask, pad)
    if packed is None:
        return None
    dtype = next(model.parameters()).dtype
    additive = dtype if getattr(config, "_attn_implementation", None) == "eager" else None
    mask = segment_attention_mask(packed.segment, additive_dtype=additive)
    start = int(query_mask.long().sum(dim=1).min()) - 1  # the earliest position that predicts a response token
    width = packed.input_ids.shape[1]
    out = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                logits_to_keep=width - start, use_cache=False)
    rows = packed.row.unsqueeze(1).expand_as(packed.logit_index)
    logits = out.logits[rows, (packed.logit_index - start).clamp(min=0)]  # 0 past the end: masked below
    return torch.where(response_mask.bool().unsqueeze(-1), logits, torch.zeros_like(logits)), None
