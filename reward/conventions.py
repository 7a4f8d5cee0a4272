"""Adapters for reward functions written for verl and OpenRLHF, so they work as sources here.

Our sources are called as trl calls reward functions (`reward.base`). Two other forms are common:

verl ``compute_score`` (one sample per call)::

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float | dict

  returns a float, or a dict whose ``"score"`` is the score (its other keys are extra information).
  Here: ``data_source`` and ``ground_truth`` are the batch columns of those names (rename with a spec's
  ``columns:``), ``solution_str`` the completion's text, ``extra_info`` a dict of the row's other columns.

OpenRLHF ``reward_func`` (a batch per call)::

    def reward_func(queries, prompts, labels, **kwargs) -> dict | tensor | list

  returns ``{"rewards": ..., "scores": ..., "extra_logs": {...}}`` (tensors or lists) or the rewards alone.
  Here: ``prompts`` the prompts' text, ``queries`` prompt text + completion text (OpenRLHF decodes the whole
  sequence; there is no chat template in between here), ``labels`` the batch column ``labels``. The
  ``"rewards"`` are the scores; ``"scores"`` (OpenRLHF's filtering signal) and ``"extra_logs"`` are logged
  through ``log_metric`` where the caller passes one.

Which form a function has is said by a spec's ``convention: trl | verl | openrlhf``, or, without one,
read from its signature by `detect_convention`: verl only when it names all of ``data_source``,
``solution_str``, ``ground_truth``; OpenRLHF only when it names all of ``queries``, ``prompts``,
``labels`` and not ``completions``; anything else is trl's form. A signature that fits none cleanly is
never adapted by a guess: it is called as trl calls it, and a parameter it lacks is an error naming it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from reward.base import NOT_COLUMNS, completion_text, prompt_text
from reward.errors import RewardError

CONVENTIONS = ("trl", "verl", "openrlhf")

VERL_NAMES = frozenset({"data_source", "solution_str", "ground_truth"})
OPENRLHF_NAMES = frozenset({"queries", "prompts", "labels"})


def _parameter_names(fn: Callable[..., Any]) -> set[str] | None:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def detect_convention(fn: Callable[..., Any]) -> str:
    """"verl", "openrlhf" or "trl", from the names ``fn`` declares (see the module docstring)."""
    names = _parameter_names(fn)
    if names is None:
        return "trl"
    if VERL_NAMES <= names:
        return "verl"
    if OPENRLHF_NAMES <= names and "completions" not in names:
        return "openrlhf"
    return "trl"


def adapt(fn: Callable[..., Any], convention: str | None, source: str) -> Callable[..., Any]:
    """``fn`` as a trl-form reward function; ``convention`` None: `detect_convention`."""
    if convention is not None and convention not in CONVENTIONS:
        raise RewardError(f"reward source '{source}': convention must be one of {CONVENTIONS}, got {convention!r}")
    chosen = convention or detect_convention(fn)
    if chosen == "verl":
        return VerlScore(fn, source)
    if chosen == "openrlhf":
        return OpenRLHFRewardFunc(fn, source)
    return fn


def _row_value(columns: Mapping[str, Any], key: str, i: int) -> Any:
    values = columns.get(key)
    return values[i] if isinstance(values, list | tuple) else None


class VerlScore:
    """verl's per-sample ``compute_score`` as a batch reward function (module docstring)."""

    def __init__(self, fn: Callable[..., Any], source: str):
        self.fn, self.source = fn, source
        self.__name__ = getattr(fn, "__name__", "compute_score")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[Any]:
        columns = {k: v for k, v in kwargs.items() if k not in NOT_COLUMNS}
        extra_keys = sorted(k for k in columns if k not in ("data_source", "ground_truth"))
        scores = []
        for i, completion in enumerate(completions):
            extra_info = {k: _row_value(columns, k, i) for k in extra_keys}
            result = self.fn(
                data_source=_row_value(columns, "data_source", i),
                solution_str=completion_text(completion, f"completion of sample {i}"),
                ground_truth=_row_value(columns, "ground_truth", i),
                extra_info=extra_info,
            )
            scores.append(self._score(result, i))
        return scores

    def _score(self, result: Any, i: int) -> Any:
        """A float as it is; a dict's "score" (verl's richer return); validated later by `RewardSource`."""
        if isinstance(result, Mapping):
            if "score" not in result:
                raise RewardError(
                    f"reward source '{self.source}' (verl compute_score) returned a dict without 'score' for "
                    f"sample {i} (keys: {sorted(result)})"
                )
            return result["score"]
        return result


def _as_list(values: Any, what: str, source: str) -> list[Any]:
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if not isinstance(values, list | tuple):
        raise RewardError(f"reward source '{source}' (OpenRLHF reward_func): '{what}' is a "
                          f"{type(values).__name__}, expected a list or a tensor")
    return list(values)


class OpenRLHFRewardFunc:
    """OpenRLHF's batch ``reward_func(queries, prompts, labels)`` as a trl-form reward function."""

    def __init__(self, fn: Callable[..., Any], source: str):
        self.fn, self.source = fn, source
        self.__name__ = getattr(fn, "__name__", "reward_func")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], labels: list | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[Any]:
        texts = [prompt_text(p, f"prompt of sample {i}") for i, p in enumerate(prompts)]
        answers = [completion_text(c, f"completion of sample {i}") for i, c in enumerate(completions)]
        queries = [p + c for p, c in zip(texts, answers)]
        result = self.fn(queries=queries, prompts=texts, labels=list(labels) if labels is not None else None)
        return self.rewards(result, log_metric)

    def rewards(self, result: Any, log_metric: Callable[[str, float], None] | None) -> list[Any]:
        """The ``"rewards"`` of a dict answer (its scores and extra_logs logged), or the answer itself."""
        if not isinstance(result, Mapping):
            return _as_list(result, "the returned value", self.source)
        if "rewards" not in result:
            raise RewardError(f"reward source '{self.source}' (OpenRLHF reward_func) returned a dict without "
                              f"'rewards' (keys: {sorted(result)})")
        if log_metric is not None:
            for key, value in log_metrics(result).items():
                log_metric(key, value)
        return _as_list(result["rewards"], "rewards", self.source)


def log_metrics(answer: Mapping[str, Any]) -> dict[str, float]:
    """The loggable means of an OpenRLHF answer: ``scores`` and each finite ``extra_logs`` entry."""
    out: dict[str, float] = {}
    items = [("scores", answer.get("scores"))] + list((answer.get("extra_logs") or {}).items())
    for key, value in items:
        if value is None:
            continue
        values = value.tolist() if hasattr(value, "tolist") else value
        values = values if isinstance(values, list | tuple) else [values]
        numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers and all(math.isfinite(v) for v in numbers):
            out[str(key)] = math.fsum(numbers) / len(numbers)
    return out
