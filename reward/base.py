"""The reward contract and the wrapper that enforces it.

A reward source is any callable, called **by keyword** exactly as trl 1.x's
GRPOTrainer / RLOOTrainer call ``reward_funcs`` (``GRPOTrainer._calculate_rewards``):

    fn(prompts=[...], completions=[...], completion_ids=[...], <column>=[...], ...,
       trainer_state=..., log_extra=..., log_metric=...) -> list[float | None]

A function takes what it names, or ``**kwargs`` (then it gets everything).
``None`` means "this source does not apply to this sample". Dataset columns
arrive holding one value per sample (``answer=[...]``). One older form is kept:
a function whose first two parameters carry none of trl's names
(``lambda p, c: ...``) gets prompts and completions positionally.

`RewardSource` wraps such a callable and makes its failures loud:

* a wrong number of scores is always an error ("expected N scores, got M");
* NaN, inf, a bool or anything that is not a real number is an error naming the
  source and the sample (``on_error="raise"``), or is logged, counted and
  returned as ``None`` (``on_error="skip"``);
* an exception (or a timeout) is an error naming the source (and, where one
  sample alone reproduces it, the sample), or in skip mode a counted failure
  of the whole batch (every score ``None``);
* ``max_consecutive_failures`` failed calls in a row abort with `RewardError`
  in either mode.

A failure is never turned into a score of 0.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from reward.errors import RewardError

logger = logging.getLogger(__name__)

Score = float | None

ON_ERROR_CHOICES = ("raise", "skip")

# Keyword arguments trl's trainers add to every reward call that are not dataset columns.
TRAINER_KWARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})

# The batch itself, by the names trl gives it (completion_ids: the sampled token ids, where a trainer has them).
BATCH_KWARGS = frozenset({"prompts", "completions", "completion_ids"})

# Keyword arguments of a call that are not dataset columns.
NOT_COLUMNS = TRAINER_KWARGS | {"completion_ids"}

# How prompts and completions reach a source: "text" (strings; conversations reduced to their last message),
# "messages" (trl's conversational form; strings wrapped as one message), "as_given" (untouched).
INPUT_FORMATS = ("text", "messages", "as_given")


# ---------------------------------------------------------------------------
# conversational -> string normalisation
# ---------------------------------------------------------------------------


def _content_text(content: Any, what: str) -> str:
    """Text of one message's ``content``: a string, or a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal blocks: keep the text parts
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and block.get("type", "text") == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    if content is None:
        return ""
    raise TypeError(f"{what}: message content of type {type(content).__name__} is not text")


def is_conversation(value: Any) -> bool:
    """True for trl's conversational form: a list of {"role", "content"} dicts."""
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(m, Mapping) and "content" in m for m in value)
    )


def completion_text(completion: Any, what: str = "completion") -> str:
    """A completion as a string: itself, or the content of its last message."""
    if isinstance(completion, str):
        return completion
    if is_conversation(completion):
        return _content_text(completion[-1]["content"], what)
    if isinstance(completion, Mapping) and "content" in completion:
        return _content_text(completion["content"], what)
    raise TypeError(f"{what} is a {type(completion).__name__}, expected a string or a list of messages")


def prompt_text(prompt: Any, what: str = "prompt") -> str:
    """A prompt as a string: itself, or the content of its last user message."""
    if isinstance(prompt, str):
        return prompt
    if is_conversation(prompt):
        users = [m for m in prompt if m.get("role") == "user"]
        last = users[-1] if users else prompt[-1]
        return _content_text(last["content"], what)
    raise TypeError(f"{what} is a {type(prompt).__name__}, expected a string or a list of messages")


def normalize_batch(
    prompts: Sequence[Any], completions: Sequence[Any], source: str
) -> tuple[list[str], list[str]]:
    """Both lists as strings; an error names the source and the sample index."""
    out_p, out_c = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        try:
            out_p.append(prompt_text(p, f"prompt of sample {i}"))
            out_c.append(completion_text(c, f"completion of sample {i}"))
        except TypeError as exc:
            raise RewardError(f"reward source '{source}': {exc}") from exc
    return out_p, out_c


def as_messages(prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """trl's conversational form: a string prompt -> one user message, a string completion -> one assistant
    message; conversations are kept as they are."""
    def wrap(value: Any, role: str) -> Any:
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    return [wrap(p, "user") for p in prompts], [wrap(c, "assistant") for c in completions]


def default_input_format(fn: Callable[..., Any]) -> str:
    """"as_given" for ``accepts_conversations = True``; "messages" for trl.rewards' functions, which read
    ``completion[0]["content"]`` (their documented input: a list of one message); else "text"."""
    if getattr(fn, "accepts_conversations", False):
        return "as_given"
    target = fn.func if isinstance(fn, functools.partial) else fn
    module = getattr(target, "__module__", None) or type(target).__module__
    return "messages" if str(module).startswith("trl.rewards") else "text"


def data_columns(columns: Mapping[str, Any], n: int) -> dict[str, list[Any]]:
    """The keyword arguments that are dataset columns (one value per sample).

    Drops what trl's trainers add to every call (``trainer_state``, ``log_extra``,
    ``log_metric``, ``environments``), the sampled ``completion_ids``, and anything
    that is not a list of length n; used by sources that ship columns elsewhere
    (HTTP, a child process).
    """
    return {
        k: list(v)
        for k, v in columns.items()
        if k not in NOT_COLUMNS and isinstance(v, list | tuple) and len(v) == n
    }


# ---------------------------------------------------------------------------
# score validation
# ---------------------------------------------------------------------------


def to_score(value: Any) -> float | None | str:
    """A float, None, or a string saying why ``value`` is not a valid score.

    Accepted: int, float, numpy scalars, 0-d tensors/arrays (anything with
    ``.item()`` and ``ndim == 0``), ``None``. Rejected: bool, strings, NaN, inf.
    """
    if value is None:
        return None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return f"a bool ({value!r}) is not a score"
    if not isinstance(value, numbers.Real):
        return f"{type(value).__name__} {_short(value)} is not a number"
    x = float(value)
    if math.isnan(x):
        return "NaN is not a score"
    if math.isinf(x):
        return f"{x} is not a finite score"
    return x


def _prompt_shown(prompt: Any) -> Any:
    """A prompt as an error message shows it: its text where it has one (a conversation's last user turn)."""
    try:
        return prompt_text(prompt)
    except TypeError:
        return prompt


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# calling user code: sync, async, with a timeout
# ---------------------------------------------------------------------------


def _await(result: Any) -> Any:
    """Run an awaitable to completion from synchronous code."""
    if not inspect.isawaitable(result):
        return result

    async def wrap():
        return await result

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wrap())
    # Called from inside a running loop (e.g. a notebook): run in a fresh loop on a helper thread.
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(wrap())
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Timeout(Exception):
    pass


def _call_with_timeout(fn: Callable[[], Any], timeout: float | None) -> Any:
    """Call ``fn()``; with a timeout, in a daemon worker thread that is abandoned on timeout.

    A Python thread cannot be killed: a hung call keeps running in the background.
    Use `reward.isolation.IsolatedReward` where the hang must be stopped.
    """
    if timeout is None:
        return _await(fn())
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = _await(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="reward-call", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise _Timeout()
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------
# the wrapper
# ---------------------------------------------------------------------------


@dataclass
class RewardStats:
    """Counters of one source since it was built.

    calls: batches scored; failures: failed calls (raised, timed out, or returned
    at least one invalid score); invalid_scores: single scores rejected (NaN,
    inf, non-number); skipped_samples: samples returned as None because of a
    failure (skip mode); consecutive_failures: failed calls in a row right now.
    """

    calls: int = 0
    failures: int = 0
    invalid_scores: int = 0
    skipped_samples: int = 0
    consecutive_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class RewardSource:
    """A reward callable with validation, failure accounting and an optional timeout.

    Args:
        fn: called by keyword as trl calls reward functions (module docstring) ->
            ``list[float | None]``; sync or async (a coroutine function, or an object
            with an async ``__call__``).
        name: logged name (trl reads it as ``__name__``); also used in metrics
            (``reward/<name>``) and in every error message.
        weight: the weight a combination gives this source.
        timeout: seconds per call, or None; the call then runs in a worker thread
            and an overrun is a failure.
        on_error: "raise" (every failure is a `RewardError`) or "skip" (failures
            are logged and counted, the affected scores are None).
        max_consecutive_failures: after this many failed calls in a row, raise
            `RewardError` whatever ``on_error`` says.
        input_format: one of `INPUT_FORMATS`; default `default_input_format` (fn).
        columns: argument name -> dataset column it is read from (``{"solution": "answer"}``
            hands the ``answer`` column to a function that names ``solution``).

    Arguments: if ``fn`` takes ``**kwargs`` it receives every keyword argument;
    otherwise only the ones it names (so ``def f(completions, answer)`` works
    under trl, which adds ``trainer_state`` and others). A required argument
    missing from the call is an error naming it.

    Input format "text" (the default) turns conversational inputs into strings
    before ``fn`` sees them (completion -> content of its last message, prompt ->
    content of its last user message).
    """

    LOCATE_BUDGET_S = 10.0

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str,
        weight: float = 1.0,
        timeout: float | None = None,
        on_error: str = "raise",
        max_consecutive_failures: int = 5,
        input_format: str | None = None,
        columns: Mapping[str, str] | None = None,
    ):
        if not callable(fn):
            raise RewardError(f"reward source '{name}': {type(fn).__name__} object is not callable")
        if not isinstance(name, str) or not name:
            raise RewardError(f"reward source name must be a non-empty string, got {name!r}")
        if on_error not in ON_ERROR_CHOICES:
            raise RewardError(
                f"reward source '{name}': on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}"
            )
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise RewardError(f"reward source '{name}': weight must be a finite number, got {weight!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0
        ):
            raise RewardError(
                f"reward source '{name}': timeout must be a positive number of seconds, got {timeout!r}"
            )
        if not isinstance(max_consecutive_failures, int) or max_consecutive_failures < 1:
            raise RewardError(
                f"reward source '{name}': max_consecutive_failures must be an integer >= 1, "
                f"got {max_consecutive_failures!r}"
            )
        input_format = default_input_format(fn) if input_format is None else input_format
        if input_format not in INPUT_FORMATS:
            raise RewardError(
                f"reward source '{name}': input format must be one of {INPUT_FORMATS}, got {input_format!r}"
            )
        self.input_format = input_format
        self.column_map = dict(columns or {})
        self.fn = fn
        self.name = name
        self.__name__ = name
        self.weight = float(weight)
        self.timeout = None if timeout is None else float(timeout)
        self.on_error = on_error
        self.max_consecutive_failures = max_consecutive_failures
        self.stats = RewardStats()
        # indices of the samples of the last call whose score failed (skip mode): "failed" is not "does not
        # apply", though both come back as None; a combination reads this to drop or re-weight those samples
        self.last_failed: list[int] = []
        self._plan = call_plan(fn)

    def __repr__(self) -> str:
        return (
            f"RewardSource(name={self.name!r}, fn={_short(self.fn)}, weight={self.weight}, "
            f"timeout={self.timeout}, on_error={self.on_error!r})"
        )

    # -- the call --------------------------------------------------------

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[Score]:
        n = len(prompts)
        if len(completions) != n:
            raise RewardError(
                f"reward source '{self.name}': got {n} prompts but {len(completions)} completions"
            )
        self.stats.calls += 1
        self.last_failed = []
        if n == 0:
            return []
        if self.input_format == "text":
            prompts, completions = normalize_batch(prompts, completions, self.name)
        elif self.input_format == "messages":
            prompts, completions = as_messages(prompts, completions)
        else:
            prompts, completions = list(prompts), list(completions)
        columns = self._renamed(columns)
        args, kwargs = self._arguments({"prompts": prompts, "completions": completions, **columns})

        try:
            raw = _call_with_timeout(lambda: self.fn(*args, **kwargs), self.timeout)
        except _Timeout:
            return self._batch_failure(
                n, f"timed out after {self.timeout:g} s on a batch of {n} samples", None
            )
        except Exception as exc:  # noqa: BLE001 - any failure of user code becomes a RewardError or a counted skip
            where = self._locate(prompts, args, kwargs, exc)
            return self._batch_failure(n, f"raised {type(exc).__name__}{where}: {exc}", exc)

        scores = self._check_count(raw, n)
        out: list[Score] = []
        invalid: list[str] = []
        for i, value in enumerate(scores):
            checked = to_score(value)
            if isinstance(checked, str):
                if self.on_error == "raise":
                    self._failed()
                    raise RewardError(
                        f"reward source '{self.name}' returned an invalid score for sample {i}: {checked}"
                    )
                invalid.append(f"sample {i}: {checked}")
                self.last_failed.append(i)
                out.append(None)
            else:
                out.append(checked)
        if invalid:
            self.stats.invalid_scores += len(invalid)
            self.stats.skipped_samples += len(invalid)
            self._failed()
            shown = "; ".join(invalid[:5]) + ("; ..." if len(invalid) > 5 else "")
            logger.warning(
                "reward source '%s' returned %d invalid score(s) (%s); scored as None (on_error='skip')",
                self.name,
                len(invalid),
                shown,
            )
            self._maybe_abort(f"the last call returned {len(invalid)} invalid score(s)")
        else:
            self.stats.consecutive_failures = 0
        return out

    # -- helpers ---------------------------------------------------------

    def _renamed(self, columns: dict[str, Any]) -> dict[str, Any]:
        """The columns with each mapped one also under its argument name (`column_map`)."""
        out = dict(columns)
        for argument, column in self.column_map.items():
            if column not in columns:
                given = sorted(k for k in columns if k not in NOT_COLUMNS)
                raise RewardError(f"reward source '{self.name}': columns maps '{argument}' to column '{column}', "
                                  f"which the batch lacks (columns given: {given or 'none'})")
            out[argument] = columns[column]
        return out

    def _arguments(self, offered: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return call_arguments(self._plan, offered, self.name)

    def _check_count(self, raw: Any, n: int) -> list[Any]:
        if isinstance(raw, str | bytes | Mapping) or raw is None:
            self._failed()
            raise RewardError(
                f"reward source '{self.name}' returned {type(raw).__name__}, expected a list of {n} scores"
            )
        try:
            scores = list(raw)
        except TypeError:
            self._failed()
            raise RewardError(
                f"reward source '{self.name}' returned {type(raw).__name__}, expected a list of {n} scores"
            ) from None
        if len(scores) != n:
            self._failed()
            raise RewardError(f"reward source '{self.name}': expected {n} scores, got {len(scores)}")
        return scores

    def _locate(self, prompts: list, args: tuple, kwargs: dict, exc: Exception) -> str:
        """In raise mode, find the first sample that fails alone (re-running samples one by one).

        Bounded by ``LOCATE_BUDGET_S`` seconds in all, each re-run by the source's own timeout too (a sample
        that hangs alone stops the search). Skipped where re-running makes no sense: skip mode, a batch of
        one, or a `RewardError` (already explicit, e.g. from a remote scorer).
        """
        n = len(prompts)
        if self.on_error != "raise" or n == 1 or isinstance(exc, RewardError):
            return f" on a batch of {n} samples" if n > 1 else " on sample 0"
        deadline = time.monotonic() + self.LOCATE_BUDGET_S

        def one(values: Any, i: int) -> Any:
            return values[i : i + 1] if isinstance(values, list) and len(values) == n else values

        for i in range(n):
            left = deadline - time.monotonic()
            stopped = f" on a batch of {n} samples (samples 0..{i - 1} pass alone; search stopped)"
            if left <= 0:
                return stopped
            row_args = tuple(one(v, i) for v in args)
            row = {k: one(v, i) for k, v in kwargs.items()}
            try:
                _call_with_timeout(lambda a=row_args, k=row: self.fn(*a, **k), min(left, self.timeout or left))
            except _Timeout:
                return stopped
            except Exception:  # noqa: BLE001 - this sample reproduces the failure
                return f" on sample {i} (prompt {_short(_prompt_shown(prompts[i]), 50)})"
        return f" on a batch of {n} samples (no single sample fails alone)"

    def _failed(self) -> None:
        self.stats.failures += 1
        self.stats.consecutive_failures += 1

    def _maybe_abort(self, last: str) -> None:
        if self.stats.consecutive_failures >= self.max_consecutive_failures:
            raise RewardError(
                f"reward source '{self.name}' failed {self.stats.consecutive_failures} calls in a row "
                f"(max_consecutive_failures={self.max_consecutive_failures}); {last}; aborting"
            )

    def _batch_failure(self, n: int, what: str, exc: Exception | None) -> list[Score]:
        self._failed()
        msg = f"reward source '{self.name}' {what}"
        if self.on_error == "raise":
            raise RewardError(msg) from exc
        self.stats.skipped_samples += n
        self.last_failed = list(range(n))
        self._maybe_abort(what)
        logger.warning("%s; %d samples scored as None (on_error='skip')", msg, n)
        return [None] * n

    def close(self) -> None:
        """Release what the wrapped source holds (connections, child processes), if anything."""
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()


@dataclass(frozen=True)
class CallPlan:
    """How a source is called. positional: prompts and completions go positionally (the older form, for a
    function whose first two parameters carry none of trl's names, e.g. ``lambda p, c``); the rest by keyword:
    everything if var_kw, else only ``names``; ``required`` must all be offered."""

    positional: bool
    var_kw: bool
    names: frozenset[str]
    required: tuple[str, ...]


def call_arguments(plan: CallPlan | None, offered: dict[str, Any], name: str) -> tuple[tuple, dict[str, Any]]:
    """(positional, keyword) arguments for a function of `CallPlan` ``plan`` out of everything a call offers
    (``prompts``, ``completions``, columns, trl's extras); RewardError naming what a required one lacks."""
    if plan is None:  # no readable signature: everything by keyword, as trl does
        return (), dict(offered)
    args: tuple = ()
    if plan.positional:
        args = (offered["prompts"], offered["completions"])
        offered = {k: v for k, v in offered.items() if k not in ("prompts", "completions")}
    kwargs = dict(offered) if plan.var_kw else {k: v for k, v in offered.items() if k in plan.names}
    missing = [k for k in plan.required if k not in kwargs]
    if missing:
        columns = sorted(k for k in offered if k not in NOT_COLUMNS | BATCH_KWARGS)
        hint = (" (completion_ids are the sampled token ids: only trainers that sample pass them)"
                if "completion_ids" in missing else
                " (trl's trainers pass these; give the parameter a default to run elsewhere)"
                if set(missing) & TRAINER_KWARGS else "")
        what = "argument(s)" if set(missing) & (BATCH_KWARGS | TRAINER_KWARGS) else "column(s)"
        raise RewardError(
            f"reward source '{name}' needs {what} {missing} that the batch lacks{hint} "
            f"(columns given: {columns or 'none'})"
        )
    return args, kwargs


def call_plan(fn: Callable) -> CallPlan | None:
    """The `CallPlan` of ``fn`` from its signature; None if it has none readable.

    trl calls by keyword; a function trl could call is called the same way here. Only a function trl could
    never call - its first two positional parameters positional-only or named neither ``prompts``,
    ``completions`` nor ``completion_ids``, or only ``*args`` - gets prompts and completions by position.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    first_two = positional[:2]
    by_position = (
        (len(first_two) == 2 and not {p.name for p in first_two} & BATCH_KWARGS)
        or any(p.kind == p.POSITIONAL_ONLY for p in first_two)
        or (var_pos and not var_kw and not positional)
    )
    rest = (positional[2:] if by_position else positional) + [p for p in params if p.kind == p.KEYWORD_ONLY]
    return CallPlan(
        positional=by_position,
        var_kw=var_kw,
        names=frozenset(p.name for p in rest),
        required=tuple(p.name for p in rest if p.default is p.empty and p.kind != p.POSITIONAL_ONLY),
    )
