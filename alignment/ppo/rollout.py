"""Rollout: sample responses, cut them at EOS, score them, and compute log-probs and values.

The sampling settings follow Huang et al. 2024: KV cache on, prompts left
padded, ``do_sample=True``, ``top_k=0``, ``top_p=1``, temperature ``T``, a
fixed ``max_new_tokens``, every model in eval mode (dropout off). Log-probs
of the sampled tokens are recomputed in one forward pass per model at the
same ``T``, with logits only over the response positions.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, fields

import torch

from alignment.errors import RewardError
from alignment.ppo.losses import entropy_from_logits, logprobs_from_logits
from policies.value import CausalLMWithValueHead, ValueHeadOutput, per_token_values

__all__ = [
    "Rollout",
    "collect_rollout",
    "concat_rollouts",
    "generate_responses",
    "left_pad_prompts",
    "position_ids_from_mask",
    "reference_model",
    "response_forward",
    "score_responses",
    "stop_token_ids",
    "truncate_after_eos",
]


@dataclass
class Rollout:
    """One batch of sampled responses; every tensor has the batch as its first dimension.

    ``response_mask`` is true on real response tokens, the EOS included.
    ``logprobs``, ``ref_logprobs``, ``values`` and ``entropy`` are
    per response token (float32, 0 at padding).

    A multi-turn rollout (:mod:`alignment.ppo.episodes`) also has
    ``policy_mask`` (true on the tokens the policy sampled; the environment's
    are false: context for the forward passes, never trained), ``env_rewards``
    (the environment's own rewards per token) and ``conversations`` (each
    episode's messages after the prompt, up to its final answer).
    """

    prompts: list[str]
    completions: list[str]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    policy_mask: torch.Tensor | None = None
    env_rewards: torch.Tensor | None = None
    conversations: list | None = None

    @property
    def token_mask(self) -> torch.Tensor:
        """The tokens the losses, the KL, the values and every statistic are taken over: real response
        tokens that the policy sampled (all real ones in a single-turn rollout)."""
        if self.policy_mask is None:
            return self.response_mask
        return self.response_mask & self.policy_mask

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


# ------------------------------------------------------------------ inputs


def left_pad_prompts(tokenizer, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts and left-pad them with the pad token: ``(ids, mask)``.

    A prompt that already starts with the BOS text (a rendered chat
    template) gets no second BOS.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one that is not the EOS token")
    bos = tokenizer.bos_token
    rows = [tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"] for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt tokenised to no tokens")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The ids that end a response (policies.tokens.end_token_ids: EOS, generation config, end of turn)."""
    from policies.tokens import end_token_ids

    ids = end_token_ids(tokenizer, model)
    if not ids:
        raise ValueError("no EOS token: the tokenizer and the model name none")
    if tokenizer.pad_token_id in ids:
        raise ValueError(
            f"the pad token ({tokenizer.pad_token!r}) is an EOS token; pad must differ from EOS "
            "or the EOS is masked and the model never learns to stop"
        )
    return sorted(ids)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding does not shift them)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# -------------------------------------------------------------- generation


@contextlib.contextmanager
def _only_our_sampling_settings(model):
    """Hide the model's own ``generation_config`` while sampling.

    transformers fills every setting our config leaves unset from the
    model's generation config (a ``repetition_penalty``, ``top_p=0.9`` or
    ``suppress_tokens`` shipped with a checkpoint would otherwise leak in and
    make the sampled distribution differ from the one PPO scores).
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def shared_prefill_cache(model, query_ids, query_mask):
    """The KV cache of every prompt column but the last, computed once per distinct prompt, one row per row.

    ``generate`` given this cache runs only the last prompt column and then decodes, so each group of
    ``G`` rows with one prompt pays one prefill instead of ``G``. Row ``i`` of the cache is its group's
    row (``batch_select_indices``); the position ids are generate's own (``cumsum(mask) - 1``, pads 1),
    so keys and values equal those of a full-batch prefill. ``None`` when no prompt repeats, the prompt
    is one column wide (nothing to prefill before the last column) or the model takes no such cache.
    """
    from alignment.ppo.packing import prompt_groups

    if query_ids.shape[1] < 2 or getattr(model.config, "is_encoder_decoder", False):
        return None
    first, group = prompt_groups(query_ids, query_mask)
    if len(first) == len(group):
        return None
    mask = query_mask[first, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = model(input_ids=query_ids[first, :-1], attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, "cache", None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(group)
    return cache


@torch.no_grad()
def generate_responses(
    model, query_ids, query_mask, *, max_new_tokens, temperature, eos_token_ids, pad_token_id, share_prefill=False,
    do_sample=True,
):
    """Sample responses ``(B, <= max_new_tokens)`` (the prompt stripped) by pure ancestral sampling at ``T``
    (``do_sample=False``: greedy, for evaluation).

    ``share_prefill``: each distinct prompt's prefill runs once (:func:`shared_prefill_cache`); the
    sampling consumes the random stream as without it, so only float rounding of the prefill differs.
    """
    from transformers import GenerationConfig

    sampling = {"top_k": 0, "top_p": 1.0, "temperature": float(temperature)} if do_sample else {}
    config = GenerationConfig(
        do_sample=bool(do_sample),
        num_beams=1,
        **sampling,
        repetition_penalty=1.0,
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=0,
        eos_token_id=list(eos_token_ids),
        pad_token_id=int(pad_token_id),
        use_cache=True,
    )
    model.eval()
    cache = shared_prefill_cache(model, query_ids, query_mask) if share_prefill else None
    extra = {} if cache is None else {"cache": cache}
    with _only_our_sampling_settings(model):
        sequences = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config, **extra)
    return sequences[:, query_ids.shape[1] :]


def truncate_after_eos(response_ids: torch.Tensor, eos_token_ids, pad_token_id: int):
    """Keep each response up to and including its first EOS; pad the rest.

    Returns ``(ids, mask, has_eos)``: ``mask`` is true up to the first EOS
    (included), or everywhere for a response with no EOS (``has_eos`` false).
    """
    is_eos = torch.isin(response_ids, torch.as_tensor(list(eos_token_ids), device=response_ids.device))
    has_eos = is_eos.any(dim=-1)
    length = response_ids.shape[-1]
    first_eos = torch.where(
        has_eos, is_eos.int().argmax(dim=-1), torch.full_like(has_eos, length - 1, dtype=torch.long)
    )
    positions = torch.arange(length, device=response_ids.device).expand_as(response_ids)
    mask = positions <= first_eos.unsqueeze(-1)
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, has_eos


# ------------------------------------------------------------ forward pass


def response_forward(model, query_ids, query_mask, response_ids, response_mask):
    """One forward pass over prompt + response; logits ``(B, R, V)`` predicting each response token.

    Only the last ``R + 1`` positions are projected to the vocabulary.
    Returns ``(logits, values)``; ``values`` ``(B, R)`` when ``model`` is a
    :class:`CausalLMWithValueHead`, else None.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    keep = response_ids.shape[1] + 1
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        logits_to_keep=keep,
        use_cache=False,
    )
    values = out.values[:, :-1] if isinstance(out, ValueHeadOutput) else None
    return out.logits[:, :-1], values


def critic_forward(critic, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
    """Values ``(B, R)`` of the states before each response token, from a separate critic."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    keep = response_ids.shape[1] + 1
    values = per_token_values(critic, input_ids, mask, position_ids_from_mask(mask), values_to_keep=keep)
    return values[:, :-1]


def _unwrap_lm(model):
    return model.pretrained_model if isinstance(model, CausalLMWithValueHead) else model


@contextlib.contextmanager
def reference_model(policy, ref_policy):
    """Yield the reference model: ``ref_policy``, or the policy with its peft adapter disabled."""
    if ref_policy is not None:
        yield ref_policy
        return
    lm = _unwrap_lm(policy)
    if not hasattr(lm, "disable_adapter"):
        raise ValueError(
            "ref_policy=None needs a peft policy (the reference is the policy with its adapter disabled)"
        )
    with lm.disable_adapter():
        yield lm


def forward_logits(model, query_ids, query_mask, response_ids, response_mask, share_prompt: bool = False):
    """:func:`response_forward`, or with ``share_prompt`` each group's prompt computed once
    (:func:`alignment.ppo.packing.shared_prompt_forward`) where the model and batch allow it."""
    if share_prompt:
        from alignment.ppo.packing import shared_prompt_forward

        shared = shared_prompt_forward(model, query_ids, query_mask, response_ids, response_mask)
        if shared is not None:
            return shared
    return response_forward(model, query_ids, query_mask, response_ids, response_mask)


@torch.no_grad()
def _policy_pass(policy, critic, batch, mask, temperature, share_prompt=False):
    logits, values = forward_logits(
        policy, batch["query_ids"], batch["query_mask"], batch["response_ids"], mask, share_prompt
    )
    logp = logprobs_from_logits(logits, batch["response_ids"], temperature)
    entropy = entropy_from_logits(logits, temperature)
    if critic is not None:
        values = critic_forward(critic, batch["query_ids"], batch["query_mask"], batch["response_ids"], mask)
    return logp, entropy, values


@torch.no_grad()
def _reference_pass(policy, ref_policy, batch, mask, temperature, share_prompt=False):
    with reference_model(policy, ref_policy) as ref:
        logits, _ = forward_logits(
            ref, batch["query_ids"], batch["query_mask"], batch["response_ids"], mask, share_prompt
        )
    return logprobs_from_logits(logits, batch["response_ids"], temperature)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _token_statistics(policy, ref_policy, critic, batch, mask, temperature, chunk_size, policy_pass=True,
                      share_prompt=False) -> dict:
    """Log-probs, reference log-probs, values and entropy per response token, ``chunk_size`` rows at a time.

    ``policy_pass=False`` (no critic): only the reference pass runs; the policy's log-probs and entropy are
    0 here, for a caller that takes them from its own forward pass (see PPOTrainer._reuses_update_pass).
    ``share_prompt``: each group of rows with one prompt runs as one packed row (:func:`forward_logits`).
    """
    parts = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    for rows in _chunks(len(mask), chunk_size):
        sub = {k: v[rows] for k, v in batch.items()}
        if policy_pass:
            logp, entropy, values = _policy_pass(policy, critic, sub, mask[rows], temperature, share_prompt)
        else:
            logp = entropy = torch.zeros(mask[rows].shape, dtype=torch.float32, device=mask.device)
            values = None
        parts["logprobs"].append(logp)
        parts["entropy"].append(entropy)
        parts["values"].append(values if values is not None else torch.zeros_like(logp))  # no critic: 0
        parts["ref_logprobs"].append(_reference_pass(policy, ref_policy, sub, mask[rows], temperature, share_prompt))
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return {k: torch.where(mask, torch.cat(v).float(), zeros) for k, v in parts.items()}


def collect_rollout(
    policy,
    ref_policy,
    critic,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    forward_batch_size: int,
    device=None,
    sampler=None,
    policy_pass: bool = True,
    share_prompt: bool = False,
    share_prefill: bool = False,
) -> Rollout:
    """Generate, truncate at EOS, then policy/reference log-probs, entropy and values (no scores).

    ``policy``, ``ref_policy`` and ``critic`` are unwrapped modules (no
    DDP); ``critic=None`` means the policy carries a value head. The
    forward passes run ``forward_batch_size`` rows at a time. ``sampler``:
    an object whose ``sample(query_ids, query_mask)`` returns right-padded
    responses (:class:`alignment.ppo.vllm_rollout.VLLMSampler`); None samples
    with transformers' generate (:func:`generate_responses`). ``share_prompt``: the log-prob passes
    compute each repeated prompt once (:func:`forward_logits`); ``share_prefill``: so does generate's
    prefill (:func:`shared_prefill_cache`).
    """
    for model in (policy, ref_policy, critic):
        if model is not None:
            model.eval()
    eos_ids = stop_token_ids(tokenizer, _unwrap_lm(policy))
    query_ids, query_mask = left_pad_prompts(tokenizer, prompts, device)
    if sampler is not None:
        raw = sampler.sample(query_ids, query_mask)
    else:
        raw = generate_responses(
            _unwrap_lm(policy),
            query_ids,
            query_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_ids=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            share_prefill=share_prefill,
        )
    response_ids, response_mask, has_eos = truncate_after_eos(raw, eos_ids, tokenizer.pad_token_id)
    batch = {"query_ids": query_ids, "query_mask": query_mask, "response_ids": response_ids}
    stats = _token_statistics(
        policy, ref_policy, critic, batch, response_mask, temperature, forward_batch_size, policy_pass, share_prompt
    )
    completions = [
        tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
        for ids, m in zip(response_ids, response_mask)
    ]
    return Rollout(
        prompts=list(prompts),
        completions=completions,
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        has_eos=has_eos,
        **stats,
    )


def _pad_to(tensor: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing == 0:
        return tensor
    pad = torch.full((tensor.shape[0], missing), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor] if left else [tensor, pad], dim=1)


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout from several, in order: prompts re-padded on the left, responses on the right."""
    if len(parts) == 1:
        return parts[0]
    query_width = max(p.query_ids.shape[1] for p in parts)
    response_width = max(p.response_ids.shape[1] for p in parts)
    left = {"query_ids": pad_token_id, "query_mask": 0}
    right = {"response_ids": pad_token_id, "response_mask": False, "policy_mask": False}
    tensors = {}
    for name in parts[0].tensors():
        if name == "has_eos":
            tensors[name] = torch.cat([p.has_eos for p in parts])
        elif name in left:
            tensors[name] = torch.cat([_pad_to(getattr(p, name), query_width, left[name], True) for p in parts])
        else:  # per response token: padding, masked out, or 0
            value = right.get(name, 0.0)
            tensors[name] = torch.cat([_pad_to(getattr(p, name), response_width, value, False) for p in parts])
    conversations = None if parts[0].conversations is None else [x for p in parts for x in p.conversations]
    return Rollout(
        prompts=[x for p in parts for x in p.prompts],
        completions=[x for p in parts for x in p.completions],
        conversations=conversations,
        **tensors,
    )


# ----------------------------------------------------------------- scoring


def _as_score(value, index: int, source: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise RewardError(
            f"reward source {source!r} returned {value!r} for sample {index}: not a number or None"
        )
    score = float(value)
    if not math.isfinite(score):
        raise RewardError(
            f"reward source {source!r} returned {score} for sample {index}; a score must be finite"
        )
    return score


def score_responses(
    reward_fn, prompts: list[str], completions: list[str], columns: dict
) -> list[float | None]:
    """Call ``reward_fn(prompts, completions, **columns)`` and validate what it returns.

    A wrong count, a NaN/inf, a non-number or an exception raises
    :class:`RewardError` naming the source; ``None`` (does not apply) is kept.
    """
    source = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    try:
        scores = list(reward_fn(prompts, completions, **columns))
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(f"reward source {source!r} failed: {type(exc).__name__}: {exc}") from exc
    if len(scores) != len(completions):
        raise RewardError(
            f"reward source {source!r} returned {len(scores)} scores for {len(completions)} completions"
        )
    return [_as_score(s, i, source) for i, s in enumerate(scores)]
