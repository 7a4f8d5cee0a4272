"""LLM-as-judge: a judge model scores completions (`JudgeReward`, the source ``judge``) or compares two
(`PairwiseJudge`, for win rates in ``align eval``).

The judge is either an OpenAI-compatible chat endpoint (``vllm serve``, ``trl vllm-serve``, any
``/v1/chat/completions``), called through `reward.remote.RemoteReward`'s transport (retries, timeouts,
auth, redaction, rate and in-flight limits), or a local causal-LM directory (greedy, batched)::

    reward:
      - source: judge
        kwargs:
          endpoint: http://127.0.0.1:8000           # or model: runs/judge (a local directory)
          model_name: Qwen/Qwen2.5-7B-Instruct      # the endpoint's "model" field
          scale: [1, 10]                            # the number the reply must hold; or choices: {yes: 1, no: 0}
          rubric: [{criterion: correct, weight: 2}, {criterion: concise, weight: 1}]   # each judged apart
          max_in_flight: 8

A judgement is parsed from the reply: the first number (within the scale), or the choice it starts with.
An unparseable judgement is a counted failure (the sample's score is NaN, which `RewardSource` counts and
never reads as 0; logged as ``unparseable``). Parsed judgements are cached by (prompt, completion,
criterion), so a repeated pair is not judged twice.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reward.base import completion_text, prompt_text
from reward.errors import RewardError
from reward.registry import register

logger = logging.getLogger(__name__)

SCALE_TEMPLATE = (
    "Rate the response to the prompt on a scale of {low} to {high}{criterion}. Answer with the number only.\n\n"
    "Prompt: {prompt}\n\nResponse: {completion}\n\nScore:"
)
CHOICE_TEMPLATE = (
    "Judge the response to the prompt{criterion}. Answer with one of: {choices}.\n\n"
    "Prompt: {prompt}\n\nResponse: {completion}\n\nAnswer:"
)
PAIRWISE_TEMPLATE = (
    "Which response answers the prompt better? Answer A, B or tie.\n\n"
    "Prompt: {prompt}\n\nResponse A: {first}\n\nResponse B: {second}\n\nAnswer:"
)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


# ------------------------------------------------------------------ parsers (pure)


def parse_scale(reply: str, low: float, high: float) -> float | None:
    """The first number of ``reply`` if it lies in [low, high], else None (unparseable)."""
    match = NUMBER.search(reply)
    if match is None:
        return None
    value = float(match.group())
    return value if low <= value <= high else None


def parse_choice(reply: str, choices: Sequence[str]) -> str | None:
    """The choice ``reply`` starts with (case and leading punctuation ignored), else None."""
    text = reply.strip().lstrip("*\"'([ ").lower()
    for choice in sorted(choices, key=len, reverse=True):  # "tie" before "t", "yes" before "y"
        if re.match(re.escape(choice.lower()) + r"\b", text):
            return choice
    return None


# ------------------------------------------------------------------ backends


def chat_url_path(endpoint: str) -> tuple[str, str]:
    """(base URL, path) of an OpenAI-compatible chat endpoint given as a base, a /v1 URL or the full path."""
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url[: -len("/chat/completions")], "/chat/completions"
    if url.endswith("/v1"):
        return url, "/chat/completions"
    return url, "/v1/chat/completions"


class EndpointBackend:
    """Replies from ``/v1/chat/completions`` (temperature 0), ``max_in_flight`` at a time."""

    def __init__(self, endpoint: str, model_name: str, max_new_tokens: int, max_in_flight: int,
                 requests_per_minute: float | None, timeout: float, retries: int, token_env: str | None):
        from reward.remote import RemoteReward

        base, self.path = chat_url_path(endpoint)
        self.client = RemoteReward(base, token_env=token_env, timeout=timeout, retries=retries, health_check=False,
                                   requests_per_minute=requests_per_minute, max_in_flight=max_in_flight)
        self.model_name, self.max_new_tokens, self.max_in_flight = model_name, max_new_tokens, max_in_flight

    def reply(self, texts: list[str], choices: Sequence[str] | None = None) -> list[str]:
        def one(text: str) -> str:
            body = self.client.post_json(self.path, {
                "model": self.model_name, "messages": [{"role": "user", "content": text}],
                "temperature": 0, "max_tokens": self.max_new_tokens}, what="judge")
            try:
                content = body["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise RewardError(f"judge {self.client.display_url}{self.path}: the answer has no "
                                  "choices[0].message.content") from None
            return content if isinstance(content, str) else ""

        if self.max_in_flight > 1 and len(texts) > 1:
            with ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="judge") as pool:
                return list(pool.map(one, texts))
        return [one(t) for t in texts]

    def close(self) -> None:
        self.client.close()


class LocalBackend:
    """Replies from a local causal LM: greedy generation, or with ``choices`` the choice whose first token
    the model ranks highest next (always one of them, so a small judge never fails to parse)."""

    def __init__(self, path: str, max_new_tokens: int, batch_size: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _render(self, text: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def reply(self, texts: list[str], choices: Sequence[str] | None = None) -> list[str]:
        import torch

        out: list[str] = []
        first_ids = ([self.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
                     if choices else None)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer([self._render(t) for t in texts[start:start + self.batch_size]],
                                   return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                if first_ids is not None:
                    logits = self.model(**batch).logits[:, -1, :]
                    picks = logits[:, first_ids].argmax(dim=-1).tolist()
                    out.extend(choices[k] for k in picks)
                    continue
                generated = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id)
            width = batch["input_ids"].shape[1]
            out.extend(self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
        return out

    def close(self) -> None:
        pass


def make_backend(endpoint: str | None, model: str | None, *, model_name: str, max_new_tokens: int,
                 max_in_flight: int, batch_size: int, requests_per_minute: float | None, timeout: float,
                 retries: int, token_env: str | None) -> Any:
    if (endpoint is None) == (model is None):
        raise RewardError("judge: give exactly one of 'endpoint' (an OpenAI-compatible URL) or 'model' "
                          "(a local causal-LM directory)")
    if endpoint is not None:
        return EndpointBackend(endpoint, model_name, max_new_tokens, max_in_flight, requests_per_minute, timeout,
                               retries, token_env)
    return LocalBackend(model, max_new_tokens, batch_size)


def _rubric(rubric: Any) -> list[tuple[str | None, float]]:
    """[(criterion, weight)]; no rubric: one judgement of the whole, weight 1."""
    if rubric is None:
        return [(None, 1.0)]
    if not isinstance(rubric, list) or not rubric:
        raise RewardError("judge: 'rubric' must be a non-empty list of {criterion, weight}")
    out = []
    for i, item in enumerate(rubric):
        if not isinstance(item, Mapping) or not isinstance(item.get("criterion"), str):
            raise RewardError(f"judge: rubric item {i} needs a 'criterion' string, got {item!r}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise RewardError(f"judge: rubric item {i} ({item['criterion']!r}): weight must be > 0, got {weight!r}")
        out.append((item["criterion"], float(weight)))
    return out


# ------------------------------------------------------------------ the source


@register("judge")
class JudgeReward:
    """A judge model's score of each completion (module docstring). Constructor arguments are the kwargs."""

    def __init__(self, endpoint: str | None = None, model: str | None = None, model_name: str = "judge",
                 template: str | None = None, scale: Sequence[float] = (1, 10),
                 choices: Mapping[str, float] | None = None, rubric: list | None = None,
                 max_new_tokens: int = 16, max_in_flight: int = 4, batch_size: int = 8,
                 requests_per_minute: float | None = None, timeout: float = 60, retries: int = 3,
                 token_env: str | None = None, cache: bool = True):
        if choices is not None and (not isinstance(choices, Mapping) or not choices):
            raise RewardError("judge: 'choices' must map each answer to its score, e.g. {yes: 1, no: 0}")
        if choices is None and (len(scale) != 2 or not scale[0] < scale[1]):
            raise RewardError(f"judge: 'scale' must be [low, high] with low < high, got {list(scale)!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.choices = {str(k): float(v) for k, v in choices.items()} if choices else None
        self.template = template or (CHOICE_TEMPLATE if self.choices else SCALE_TEMPLATE)
        for key in ("{prompt}", "{completion}"):
            if key not in self.template:
                raise RewardError(f"judge: the template must contain {key}")
        self.rubric = _rubric(rubric)
        self.cache: dict[tuple[str, str, str | None], float] | None = {} if cache else None
        self.backend = make_backend(endpoint, model, model_name=model_name, max_new_tokens=max_new_tokens,
                                    max_in_flight=max_in_flight, batch_size=batch_size,
                                    requests_per_minute=requests_per_minute, timeout=timeout, retries=retries,
                                    token_env=token_env)
        self.judged = self.unparseable = self.cache_hits = 0
        self.__name__ = "judge"

    def render(self, prompt: str, completion: str, criterion: str | None) -> str:
        return self.template.format(
            prompt=prompt, completion=completion, low=f"{self.scale[0]:g}", high=f"{self.scale[1]:g}",
            choices=", ".join(self.choices or ()), criterion=f" for this criterion: {criterion}" if criterion else "")

    def parse(self, reply: str) -> float | None:
        if self.choices:
            choice = parse_choice(reply, list(self.choices))
            return None if choice is None else self.choices[choice]
        return parse_scale(reply, *self.scale)

    def __call__(self, prompts: list[Any], completions: list[Any], log_metric: Any = None, **columns: Any) -> list[float]:
        texts = [(prompt_text(p), completion_text(c)) for p, c in zip(prompts, completions)]
        keys = [(p, c, criterion) for p, c in texts for criterion, _ in self.rubric]
        known = dict(self.cache or {})
        todo = sorted({k for k in keys if k not in known}, key=keys.index)
        hits = len(keys) - sum(1 for k in keys if k not in known)
        replies = self.backend.reply([self.render(*k) for k in todo], list(self.choices) if self.choices else None)
        fresh: dict[tuple, float | None] = {}
        for key, reply in zip(todo, replies):
            fresh[key] = self.parse(reply)
            if fresh[key] is None:
                logger.warning("judge: unparseable judgement of prompt %r (criterion %r): %r; counted as a failure",
                               key[0][:60], key[2], reply[:120])
            elif self.cache is not None:
                self.cache[key] = fresh[key]
        values = {**known, **fresh}
        bad = sum(1 for v in fresh.values() if v is None)
        self.judged, self.unparseable, self.cache_hits = self.judged + len(todo), self.unparseable + bad, \
            self.cache_hits + hits
        if log_metric is not None:
            log_metric("unparseable", float(bad))
            log_metric("cache_hits", float(hits))
        total_weight = math.fsum(w for _, w in self.rubric)
        scores = []
        for p, c in texts:
            parts = [(values[(p, c, criterion)], w) for criterion, w in self.rubric]
            if any(v is None for v, _ in parts):
                scores.append(math.nan)  # a failed judgement: RewardSource counts it, never a 0
            else:
                scores.append(math.fsum(v * w for v, w in parts) / total_weight)
        return scores

    def close(self) -> None:
        self.backend.close()


# ------------------------------------------------------------------ pairwise


class PairwiseJudge:
    """Which of two completions a judge prefers, each pair judged in both orders (position bias shows)."""

    CHOICES = ("A", "B", "tie")

    def __init__(self, endpoint: str | None = None, model: str | None = None, model_name: str = "judge",
                 template: str = PAIRWISE_TEMPLATE, max_new_tokens: int = 8, max_in_flight: int = 4,
                 batch_size: int = 8, requests_per_minute: float | None = None, timeout: float = 60,
                 retries: int = 3, token_env: str | None = None):
        for key in ("{prompt}", "{first}", "{second}"):
            if key not in template:
                raise RewardError(f"pairwise judge: the template must contain {key}")
        self.template = template
        self.backend = make_backend(endpoint, model, model_name=model_name, max_new_tokens=max_new_tokens,
                                    max_in_flight=max_in_flight, batch_size=batch_size,
                                    requests_per_minute=requests_per_minute, timeout=timeout, retries=retries,
                                    token_env=token_env)

    def verdicts(self, prompts: list[str], a: list[str], b: list[str]) -> list[tuple[str | None, str | None]]:
        """Per prompt: (choice with a shown first, choice with b shown first); None: unparseable."""
        texts = [self.template.format(prompt=p, first=x, second=y) for p, x, y in zip(prompts, a, b)]
        texts += [self.template.format(prompt=p, first=y, second=x) for p, x, y in zip(prompts, a, b)]
        replies = [parse_choice(r, self.CHOICES) for r in self.backend.reply(texts, list(self.CHOICES))]
        n = len(prompts)
        return list(zip(replies[:n], replies[n:]))

    def close(self) -> None:
        self.backend.close()


def pairwise_outcome(first: str | None, second: str | None) -> str:
    """"a", "b", "tie", "inconsistent" or "unparseable" of a pair judged with a first, then with b first."""
    if first is None or second is None:
        return "unparseable"
    a_in_first = {"A": "a", "B": "b", "tie": "tie"}[first]
    a_in_second = {"A": "b", "B": "a", "tie": "tie"}[second]  # b was shown first: A means b
    return a_in_first if a_in_first == a_in_second else "inconsistent"


def pairwise_table(verdicts: list[tuple[str | None, str | None]]) -> dict[str, float | int | None]:
    """Counts and rates: a's win rate (ties and inconsistent pairs as half), both-order agreement, position bias.

    first_position_rate: share of decided judgements (A or B) that picked the response shown first; 0.5 = none.
    """
    outcomes = [pairwise_outcome(f, s) for f, s in verdicts]
    counts = {k: outcomes.count(k) for k in ("a", "b", "tie", "inconsistent", "unparseable")}
    valid = len(outcomes) - counts["unparseable"]
    decided = [v for pair in verdicts if None not in pair for v in pair if v in ("A", "B")]
    return {
        "n": len(outcomes), "wins": counts["a"], "losses": counts["b"], "ties": counts["tie"],
        "inconsistent": counts["inconsistent"], "unparseable": counts["unparseable"],
        "win_rate": (counts["a"] + 0.5 * (counts["tie"] + counts["inconsistent"])) / valid if valid else None,
        "agreement": (valid - counts["inconsistent"]) / valid if valid else None,
        "first_position_rate": decided.count("A") / len(decided) if decided else None,
    }
