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

__all__ = ["PackedBatch", "first_fit_bins", "pack_sequences", "packed_response_forward"]


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
