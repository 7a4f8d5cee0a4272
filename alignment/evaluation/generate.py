"""Generation and log-likelihoods for evaluation, with plain transformers.

* :func:`generate_completions` - batched, left-padded, seeded generation
  from strings or chat-message lists; each completion cut at its first EOS.
* :func:`sequence_logprobs` - summed (or per-token) log-probabilities of
  given completions under a model, for KL to a reference.
* :func:`text_nll` - summed NLL and token count of texts, for perplexity.

Prompts are either a string (tokenized as is, with the tokenizer's own
special tokens, e.g. a BOS) or a list of ``{"role", "content"}`` messages
(rendered with the tokenizer's chat template and ``add_generation_prompt=True``,
then tokenized without adding special tokens, since the template writes them).
Every function puts the model in eval mode, runs without gradients and
restores the model's train/eval mode afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from alignment.errors import DataError

__all__ = ["completion_nll", "generate_completions", "reference_completion_ids", "render_prompt", "sequence_logprobs",
           "text_nll"]


# --------------------------------------------------------------------------- prompts and tokens


def render_prompt(tokenizer, prompt: str | Sequence[dict]) -> str:
    """The prompt text the model sees: a string as is, a message list through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("prompt is a list of chat messages but the tokenizer has no chat_template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    raise DataError(
        f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}: {prompt!r:.80}"
    )


def _encode_prompt(tokenizer, prompt: str | Sequence[dict]) -> list[int]:
    """Token ids of one prompt (see the module docstring for when special tokens are added)."""
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bos = tokenizer.bos_token_id
        # A string that already starts with the BOS text (an already-rendered chat prompt) must not get a second one.
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids
    text = render_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a completion (policies.tokens.end_token_ids); none is an error."""
    from policies.tokens import end_token_ids

    ids = end_token_ids(tokenizer, model)
    if not ids:
        raise DataError("the tokenizer has no eos_token_id; generation could never stop on end-of-sequence")
    return ids


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise DataError("the tokenizer has neither a pad_token_id nor an eos_token_id to pad batches with")


def _cut_at_eos(token_ids: Sequence[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Generated ids up to and including the first EOS (and whether there was one)."""
    for i, tok in enumerate(token_ids):
        if tok in eos_ids:
            return list(token_ids[: i + 1]), True
    return list(token_ids), False


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _batches(n: int, batch_size: int) -> Iterator[range]:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield range(start, min(start + batch_size, n))


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _inference(model):
    """Eval mode and no autograd inside; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's RNGs inside the block without disturbing the caller's RNG state."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- generation


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Generate one completion per prompt.

    Greedy when ``do_sample`` is False; otherwise samples from the full
    softmax(logits / temperature) (top-k and top-p are switched off, whatever
    the model's generation config says, so samples come from the policy
    itself, as KL estimates and "sampled accuracy" need). Batches are
    left-padded; batch b is generated under seed ``seed + b``, so the same
    prompts, batch size and seed give the same completions.

    Returns one dict per prompt, in order:

    * ``text`` - the completion decoded without special tokens, cut before the first EOS
    * ``num_tokens`` - completion tokens before the EOS (the EOS itself not counted)
    * ``ended_with_eos`` - whether an EOS was generated within ``max_new_tokens``
    * ``token_ids`` - the generated ids up to and including the first EOS
      (pass them to :func:`sequence_logprobs` to score exactly what was sampled)
    * ``prompt_text`` - the rendered prompt
    """
    if do_sample and not temperature > 0:
        raise DataError(f"sampling needs temperature > 0, got {temperature}")
    prompts = list(prompts)
    if not prompts:
        return []
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    device = _device(model)
    encoded = [_encode_prompt(tokenizer, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"prompt {i} is empty after tokenization: {prompts[i]!r:.80}")

    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids),
    )
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        # override sampling settings a hub model's generation_config may carry, so greedy stays greedy and quiet
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)

    results: list[dict[str, Any]] = []
    with _inference(model):
        for b, rows in enumerate(_batches(len(prompts), batch_size)):
            input_ids, attention_mask = _left_pad([encoded[i] for i in rows], pad_id, device)
            with _seeded(seed + b, device):
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            generated = out[:, input_ids.shape[1] :].tolist()
            for i, gen in zip(rows, generated):
                ids, ended = _cut_at_eos(gen, eos_ids)
                body = ids[:-1] if ended else ids
                results.append(
                    {
                        "text": tokenizer.decode(body, skip_special_tokens=True),
                        "num_tokens": len(body),
                        "ended_with_eos": ended,
                        "token_ids": ids,
                        "prompt_text": render_prompt(tokenizer, prompts[i]),
                    }
                )
    return results


# --------------------------------------------------------------------------- log-likelihoods


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per position, in float32: logits [T, V], targets [T]."""
    logits = logits.float() / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(
    model,
    tokenizer,
    prompt_texts: Sequence[str | Sequence[dict]],
    completions: Sequence[str | Sequence[int]],
    temperature: float = 1.0,
    *,
    batch_size: int = 16,
    per_token: bool = False,
) -> list[float] | list[list[float]]:
    """Log-probability of each completion given its prompt.

    For completion tokens y_1..y_T after prompt x::

        log p(y | x) = sum_t log softmax(logits_t / temperature)[y_t]

    where logits_t are the model's logits at the position before y_t. Use the
    temperature the completions were sampled with, so the log-probs are those
    of the distribution that produced them. A completion is token ids (exact;
    e.g. ``token_ids`` from :func:`generate_completions`, EOS included) or a
    string (tokenized without special tokens, so no EOS is added). Prompts are
    encoded as in :func:`generate_completions`.

    Returns one float per sample, or with ``per_token=True`` one list of
    per-token log-probs per sample (feed them to ``stats.kl_monte_carlo``).
    """
    if len(prompt_texts) != len(completions):
        raise DataError(f"sequence_logprobs: {len(prompt_texts)} prompts but {len(completions)} completions")
    if not temperature > 0:
        raise DataError(f"sequence_logprobs: temperature must be > 0, got {temperature}")
    pad_id = _pad_id(tokenizer)
    device = _device(model)
    prompts_ids = [_encode_prompt(tokenizer, p) for p in prompt_texts]
    completion_ids = [
        list(tokenizer(c, add_special_tokens=False)["input_ids"])
        if isinstance(c, str)
        else [int(t) for t in c]
        for c in completions
    ]
    for i, ids in enumerate(prompts_ids):
        if not ids:
            raise DataError(f"sequence_logprobs: prompt {i} is empty after tokenization")

    results: list = []
    with _inference(model):
        for rows in _batches(len(prompts_ids), batch_size):
            full = [prompts_ids[i] + completion_ids[i] for i in rows]
            input_ids, attention_mask = _right_pad(full, pad_id, device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            for row, i in enumerate(rows):
                # the logit at position start predicts the first completion token; only the completion's
                # positions are upcast and normalised, so memory stays ~ one [tokens, vocab] slice per row
                start, length = len(prompts_ids[i]) - 1, len(completion_ids[i])
                targets = input_ids[row, start + 1 : start + 1 + length]
                values = _token_logprobs(logits[row, start : start + length], targets, temperature)
                results.append(values.tolist() if per_token else float(values.sum()))
    return results


def reference_completion_ids(tokenizer, prompt: str | Sequence[dict], completion: str | Sequence[dict]) -> list[int]:
    """Token ids of a reference completion exactly as a trained policy would produce them after `prompt`.

    Conversations: the chat template's rendering of prompt + completion, minus the
    rendered prompt with its generation prompt (so the end-of-turn token is included,
    as SFT trains it). Plain text: the completion's tokens and EOS.
    """
    if isinstance(prompt, str):
        text = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    messages = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    rendered = tokenizer.apply_chat_template(list(prompt) + messages, tokenize=False, add_generation_prompt=False)
    full = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    head = _encode_prompt(tokenizer, prompt)
    if full[: len(head)] != head:
        raise DataError("the chat template renders the prompt differently with and without the answer; "
                        "perplexity of the reference completion cannot be separated from the prompt's")
    return full[len(head):]


def completion_nll(model, tokenizer, prompts, completions, *, batch_size: int = 16) -> tuple[float, int]:
    """Summed NLL (nats) of reference completions given their prompts, and the number of completion tokens::

        total_nll = - sum_i sum_t log p(y_i,t | x_i, y_i,<t) ,  total_tokens = sum_i |y_i|

    The prompt tokens are conditioned on, never scored: a chat policy is not trained to predict the
    user's text, and counting it would make perplexity measure the prompts.
    """
    ids = [reference_completion_ids(tokenizer, p, c) for p, c in zip(prompts, completions)]
    per_token = sequence_logprobs(model, tokenizer, prompts, ids, batch_size=batch_size, per_token=True)
    return -sum(sum(values) for values in per_token), sum(len(values) for values in per_token)


def text_nll(
    model,
    tokenizer,
    texts: Sequence[str | Sequence[dict]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of texts and the number of tokens it covers.

    Each text (a string, or a full conversation rendered by the chat template
    without a generation prompt) is tokenized with the tokenizer's special
    tokens and truncated to ``max_length``; every token after the first is
    predicted from its prefix::

        total_nll = - sum_texts sum_{t >= 2} log p(x_t | x_<t) ,  total_tokens = sum_texts (len - 1)

    so ``stats.perplexity_from_nll(total_nll, total_tokens)`` is the perplexity.
    """
    pad_id = _pad_id(tokenizer)
    device = _device(model)
    encoded = []
    for text in texts:
        if isinstance(text, str):
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        else:
            rendered = tokenizer.apply_chat_template(list(text), tokenize=False, add_generation_prompt=False)
            ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        encoded.append(ids[:max_length] if max_length else ids)
    encoded = [ids for ids in encoded if len(ids) >= 2]  # a one-token text has nothing to predict
    if not encoded:
        raise DataError("text_nll: no text has two or more tokens to score")

    total_nll = 0.0
    total_tokens = 0
    with _inference(model):
        for rows in _batches(len(encoded), batch_size):
            input_ids, attention_mask = _right_pad([encoded[i] for i in rows], pad_id, device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            for row, i in enumerate(rows):
                n = len(encoded[i])
                values = _token_logprobs(logits[row, : n - 1], input_ids[row, 1:n], 1.0)
                total_nll -= float(values.sum())
                total_tokens += n - 1
    return total_nll, total_tokens
