"""Several reward sources with weights: building them from recipe specs, and their weighted sum.

A recipe's ``reward:`` section is a list of specs::

    reward:
      - source: answer_match            # required: any string reward.registry.resolve accepts
        weight: 1.0                     # default 1.0
      - source: length_target
        name: brevity                   # default derived from the source
        weight: 0.1
        kwargs: {target: 20}            # passed to the source
        on_error: skip                  # "raise" (default), "skip" or "reweight" (below)
        timeout: 5                      # seconds per call (default 300; for a URL: per HTTP request)
      - source: untrusted.py:score
        isolate: true                   # separate process; timeout (default 60 s) and memory_mb (default 2048)
      - source: https://rm.example.org
        token_env: RM_TOKEN             # URL sources: env var holding the bearer token
        protocol: openrlhf              # align (default) | openrlhf | llamafactory (reward.protocols)
        requests_per_minute: 120        # rate limit over every HTTP attempt, retries included
        max_in_flight: 4                # concurrent requests of one call, each of batch_size samples
        batch_size: 16
      - source: trl.rewards:get_soft_overlong_punishment
        factory: true                   # the function builds the reward function: kwargs go to it
        kwargs: {max_completion_len: 16, soft_punish_cache: 4}
      - source: my_verl.py:compute_score
        convention: verl                # trl (default) | verl | openrlhf; without it, read from the signature
        columns: {ground_truth: answer} # argument name -> dataset column
        input: text                     # text | messages | as_given (default: messages for trl.rewards)

A plain string is short for ``{source: <string>}``.

"Does not apply" and "failed" differ.  A source returning None for a sample does
not apply to it: the total sums the sources that did.  A source that *failed* on
a sample (raised, timed out, NaN; ``on_error: skip``) makes the sample's total
None, so the sample is dropped from the update and counted
(``reward/dropped_samples``), never scored 0 for that source.  With
``on_error: reweight`` the sample is kept instead, its total re-weighted over
the sources that applied: ``sum_applied w_i s_i * (W_applied + W_failed) / W_applied``
(counted as ``reward/reweighted_samples``).
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union

from reward.base import INPUT_FORMATS, ON_ERROR_CHOICES, RewardSource
from reward.conventions import CONVENTIONS
from reward.errors import RewardError
from reward.protocols import PROTOCOLS
from reward.registry import default_name, resolve

logger = logging.getLogger(__name__)

# Seconds per call of an in-process source without a `timeout`: a hung reward must fail the call (counted, or
# an error), not hang the run forever.  Generous, since one call scores a whole batch (a reward model on a CPU).
DEFAULT_TIMEOUT_S = 300.0

# on_error of a spec: the RewardSource modes, and "reweight" (skip mode in the source, re-weighting here)
SPEC_ON_ERROR_CHOICES = ON_ERROR_CHOICES + ("reweight",)


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def _rule(check) -> dict:
    """Field metadata: a range rule (value -> error text, or None when fine), read by the recipe loader."""
    return {"check": check}


@dataclass(frozen=True)
class RewardSpec:
    """The keys of one reward spec, their types, defaults and ranges: the one list of what a spec may say.

    `build_source` accepts exactly these keys (`SPEC_KEYS`); a recipe's ``reward:`` and ``eval.rewards`` entries are
    checked against this class when the recipe loads (alignment.recipe), so `align validate` and `reward.build`
    cannot drift apart.  docs/rewards.md documents each key (tests/foundation/test_validate.py checks it).
    """

    source: str
    weight: float = 1.0
    name: Union[str, None] = None
    kwargs: dict = field(default_factory=dict)
    timeout: Union[float, None] = field(default=None, metadata=_rule(_positive))
    on_error: Literal[SPEC_ON_ERROR_CHOICES] = "raise"  # skip: drop a failed sample; reweight: keep it
    isolate: bool = False
    token_env: Union[str, None] = None
    # isolate: address-space limit of the child process (None: 2048 MB, the IsolatedReward default)
    memory_mb: Union[int, None] = field(default=None, metadata=_rule(_positive))
    max_consecutive_failures: int = field(default=5, metadata=_rule(_positive))
    # how the function is written: trl (keyword call), verl (compute_score) or openrlhf (reward_func);
    # null: read from its signature (reward.conventions.detect_convention)
    convention: Union[Literal[CONVENTIONS], None] = None
    columns: dict = field(default_factory=dict)  # argument name -> dataset column, e.g. {solution: answer}
    input: Union[Literal[INPUT_FORMATS], None] = None  # null: messages for trl.rewards
    factory: bool = False  # the source builds the reward function (trl.rewards:get_*): kwargs go to it
    # URL sources: the wire protocol and the limits on requests (reward.remote.RemoteReward)
    protocol: Union[Literal[PROTOCOLS], None] = None
    requests_per_minute: Union[float, None] = field(default=None, metadata=_rule(_positive))
    max_in_flight: Union[int, None] = field(default=None, metadata=_rule(_positive))
    batch_size: Union[int, None] = field(default=None, metadata=_rule(_positive))


SPEC_KEYS = tuple(f.name for f in fields(RewardSpec))

# Keys of URL sources only (reward.remote.RemoteReward's settings)
URL_KEYS = ("protocol", "requests_per_minute", "max_in_flight", "batch_size")


@dataclass
class RewardResult:
    """The outcome of one combined call.

    total: per sample, sum over the sources that applied (score not None) of
        weight * score; None where no source applied.
    per_source: each source's scores, by name.
    metrics: ``reward/<name>`` (mean over applied samples; absent if none
        applied), ``reward/<name>/failures`` and ``reward/<name>/skipped``
        (failed calls and samples skipped by failures during this call), and
        ``reward/total`` (mean of the non-None totals).
    """

    total: list[float | None]
    per_source: dict[str, list[float | None]]
    metrics: dict[str, float] = field(default_factory=dict)
    failed: dict[str, list[int]] = field(default_factory=dict)  # per source: samples whose score failed
    dropped: list[int] = field(default_factory=list)  # samples whose total is None because a source failed


def failure_scale(weights: list[float], failed: list[bool], applied: list[bool], reweight: list[bool]) -> float | None:
    """The factor a sample's weighted sum over its applied sources is multiplied by; None: drop the sample.

    1.0 when no source failed.  A failed source drops the sample (None), unless it asked for re-weighting:
    then the applied sources stand in for the failed ones' weight, (W_applied + W_failed) / W_applied
    (None too when nothing applied).  Sources that do not apply take no part either way.
    """
    if not any(failed):
        return 1.0
    if not all(r for r, f in zip(reweight, failed) if f):
        return None
    applied_weight = math.fsum(w for w, a in zip(weights, applied) if a)
    failed_weight = math.fsum(w for w, f in zip(weights, failed) if f)
    if not applied_weight:
        return None
    return (applied_weight + failed_weight) / applied_weight


def with_metric_logger(columns: dict[str, Any], logged: dict[str, list[float]]) -> dict[str, Any]:
    """The call's keyword arguments with a trl-style ``log_metric(name, value)`` collecting into ``logged``,
    unless the caller (trl's trainer) passes its own."""
    if "log_metric" in columns:
        return columns

    def log_metric(name: str, value: float) -> None:
        logged.setdefault(str(name), []).append(float(value))

    return {**columns, "log_metric": log_metric}


class CombinedReward:
    """Call every source on a batch and combine the scores with their weights.

    For trl: ``GRPOTrainer(reward_funcs=combined.sources, args=GRPOConfig(reward_weights=combined.weights))``.
    (trl sums with nansum, so a sample no source applies to gets 0 there; here it gets None.)
    """

    def __init__(self, sources: list[RewardSource], reweight: set[str] | None = None):
        if not sources:
            raise RewardError("a combined reward needs at least one source")
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RewardError(
                f"reward source names must be unique; repeated: {dupes} (set 'name' in the spec)"
            )
        self.sources = list(sources)
        self.reweight = set(reweight or ())  # names of the sources whose failures re-weight (on_error: reweight)

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def __repr__(self) -> str:
        return "CombinedReward(" + ", ".join(f"{s.name}*{s.weight:g}" for s in self.sources) + ")"

    def sample_scales(self, applied: list[list[bool]]) -> list[float | None]:
        """Per sample of the last call, :func:`failure_scale` (None: drop it).

        applied[j][i]: source j gave sample i a score; the failures come from each source's ``last_failed``.
        Used here and by the GRPO/RLOO trainers, which call the sources themselves.
        """
        reweight = [s.name in self.reweight for s in self.sources]
        failed_sets = [set(s.last_failed) for s in self.sources]
        n = len(applied[0]) if applied else 0
        return [failure_scale(self.weights, [i in f for f in failed_sets], [a[i] for a in applied], reweight)
                for i in range(n)]

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> RewardResult:
        n = len(prompts)
        per_source: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for source in self.sources:
            before = (source.stats.failures, source.stats.skipped_samples)
            logged: dict[str, list[float]] = {}
            scores = source(prompts, completions, **with_metric_logger(columns, logged))
            for key, values in logged.items():
                metrics[f"reward/{source.name}/{key}"] = math.fsum(values) / len(values)
            per_source[source.name] = scores
            applied = [s for s in scores if s is not None]
            if applied:
                metrics[f"reward/{source.name}"] = math.fsum(applied) / len(applied)
            metrics[f"reward/{source.name}/failures"] = float(source.stats.failures - before[0])
            metrics[f"reward/{source.name}/skipped"] = float(source.stats.skipped_samples - before[1])
        total: list[float | None] = []
        dropped, reweighted = [], 0
        applied_flags = [[v is not None for v in per_source[s.name]] for s in self.sources]
        for i, scale in enumerate(self.sample_scales(applied_flags)):
            parts = [s.weight * per_source[s.name][i] for s in self.sources if per_source[s.name][i] is not None]
            if scale is None:
                dropped.append(i)
                total.append(None)
                continue
            reweighted += scale != 1.0
            total.append(scale * math.fsum(parts) if parts else None)
        applied_total = [t for t in total if t is not None]
        if applied_total:
            metrics["reward/total"] = math.fsum(applied_total) / len(applied_total)
        metrics["reward/dropped_samples"] = float(len(dropped))
        metrics["reward/reweighted_samples"] = float(reweighted)
        if dropped:
            logger.warning("%d of %d samples dropped from the update: a reward source failed on them "
                           "(a failure is never a score of 0)", len(dropped), n)
        failed = {s.name: list(s.last_failed) for s in self.sources}
        return RewardResult(total=total, per_source=per_source, metrics=metrics, failed=failed, dropped=dropped)

    def close(self) -> None:
        """Close connections and child processes the sources hold."""
        for source in self.sources:
            source.close()


def _spec_error(i: int, message: str) -> RewardError:
    return RewardError(f"reward spec #{i}: {message}")


def _number(i: int, spec: dict, key: str, positive: bool) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _spec_error(i, f"'{key}' must be a number, got {value!r}")
    if positive and value <= 0:
        raise _spec_error(i, f"'{key}' must be > 0, got {value!r}")
    return float(value)


def is_url_source(source: str) -> bool:
    return source.strip().startswith(("http://", "https://"))


def check_key_combination(spec: Mapping, index: int = 0) -> None:
    """The rules between the keys of one spec (which keys apply to which kind of source), checked without
    resolving the source: `build_source` checks them first, and the recipe loader checks them too, so
    `align validate` refuses what `reward.build` would."""
    source, isolate = spec["source"], spec.get("isolate", False)
    where, is_url = f"({source})", is_url_source(source)
    token_env = spec.get("token_env")
    if token_env is not None and (not is_url or not isinstance(token_env, str)):
        raise _spec_error(
            index, f"{where} 'token_env' applies only to http(s) URL sources, as a variable name"
        )
    memory_mb = spec.get("memory_mb")
    if memory_mb is not None and (
        not isolate or isinstance(memory_mb, bool) or not isinstance(memory_mb, int)
    ):
        raise _spec_error(index, f"{where} 'memory_mb' needs 'isolate: true' and an integer number of MB")
    url_only = [key for key in URL_KEYS if spec.get(key) is not None]
    if url_only and not is_url:
        raise _spec_error(index, f"{where} {url_only} apply to http(s) URL sources only")
    local_only = [key for key in ("convention", "factory") if spec.get(key)]
    if local_only and (is_url or isolate):
        raise _spec_error(index, f"{where} {local_only} apply to in-process functions only")
    if isolate and is_url:
        raise _spec_error(index, f"{where} 'isolate' applies to local code; a URL is already out of process")


def build_source(spec: dict[str, Any] | str, index: int = 0) -> RewardSource:
    """One spec (see the module docstring) -> a `RewardSource`."""
    if isinstance(spec, str):
        spec = {"source": spec}
    if not isinstance(spec, Mapping):
        raise _spec_error(index, f"expected a mapping with a 'source' key, got {type(spec).__name__}")
    for key in spec:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise _spec_error(index, f"unknown key '{key}'.{hint} Valid keys: {', '.join(SPEC_KEYS)}")
    source = spec.get("source")
    if not isinstance(source, str) or not source.strip():
        raise _spec_error(index, f"'source' is required and must be a non-empty string, got {source!r}")
    where = f"({source})"
    weight = _number(index, spec, "weight", positive=False)
    timeout = _number(index, spec, "timeout", positive=True)
    name = spec.get("name") or default_name(source)
    if not isinstance(name, str):
        raise _spec_error(index, f"'name' must be a string, got {name!r}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise _spec_error(index, f"{where} 'kwargs' must be a mapping, got {type(kwargs).__name__}")
    on_error = spec.get("on_error", "raise")
    if on_error not in SPEC_ON_ERROR_CHOICES:
        raise _spec_error(index, f"{where} 'on_error' must be one of {SPEC_ON_ERROR_CHOICES}, got {on_error!r}")
    isolate = spec.get("isolate", False)
    if not isinstance(isolate, bool):
        raise _spec_error(index, f"{where} 'isolate' must be true or false, got {isolate!r}")
    is_url = is_url_source(source)
    check_key_combination(spec, index)
    token_env, memory_mb = spec.get("token_env"), spec.get("memory_mb")
    max_fail = spec.get("max_consecutive_failures", 5)
    if isolate:
        from reward.isolation import IsolatedReward

        fn = IsolatedReward(source, timeout=timeout or 60.0, memory_mb=memory_mb or 2048, kwargs=kwargs)
        call_timeout = None  # the child is killed on overrun; no second timer
    elif is_url:
        url_kwargs = dict(kwargs)
        url_kwargs.update({key: spec[key] for key in URL_KEYS if spec.get(key) is not None})
        if token_env:
            url_kwargs["token_env"] = token_env
        if timeout:
            url_kwargs["timeout"] = timeout
        fn = resolve(source, **url_kwargs)
        call_timeout = None  # per HTTP request, with bounded retries
    else:
        fn = _local_function(index, spec, source, kwargs)
        call_timeout = timeout or DEFAULT_TIMEOUT_S
    return RewardSource(
        fn,
        name=name,
        weight=1.0 if weight is None else weight,
        timeout=call_timeout,
        on_error="skip" if on_error == "reweight" else on_error,
        max_consecutive_failures=max_fail,
        input_format=_choice(index, spec, "input", INPUT_FORMATS),
        columns=_column_map(index, spec),
    )


def _choice(index: int, spec: Mapping, key: str, choices: tuple[str, ...]) -> str | None:
    value = spec.get(key)
    if value is not None and value not in choices:
        raise _spec_error(index, f"({spec['source']}) '{key}' must be one of {choices}, got {value!r}")
    return value


def _column_map(index: int, spec: Mapping) -> dict[str, str]:
    mapping = spec.get("columns") or {}
    if not isinstance(mapping, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in mapping.items()):
        raise _spec_error(index, f"({spec['source']}) 'columns' must map argument names to column names, "
                                 f"got {mapping!r}")
    return dict(mapping)


def _local_function(index: int, spec: Mapping, source: str, kwargs: Mapping) -> Any:
    """The in-process callable of a spec: resolved, built by its factory if so marked, adapted to trl's form."""
    from reward.conventions import CONVENTIONS, adapt

    factory = spec.get("factory", False)
    if not isinstance(factory, bool):
        raise _spec_error(index, f"({source}) 'factory' must be true or false, got {factory!r}")
    if factory:
        maker = resolve(source)
        try:
            fn = maker(**kwargs)
        except Exception as exc:
            raise _spec_error(index, f"({source}) the factory failed: {type(exc).__name__}: {exc}") from exc
        if not callable(fn):
            raise _spec_error(index, f"({source}) the factory returned a {type(fn).__name__}, not a function")
    else:
        fn = resolve(source, **kwargs)
    return adapt(fn, _choice(index, spec, "convention", CONVENTIONS), source)


def build(specs: list[dict[str, Any] | str]) -> CombinedReward:
    """A recipe's ``reward:`` list -> a `CombinedReward` (errors name the spec index and key)."""
    if isinstance(specs, Mapping | str):
        specs = [specs]
    if not isinstance(specs, list | tuple) or not specs:
        raise RewardError("the reward section must be a non-empty list of sources")
    sources: list[RewardSource] = []
    try:
        for i, spec in enumerate(specs):
            sources.append(build_source(spec, i))
        reweight = {source.name for source, spec in zip(sources, specs)
                    if isinstance(spec, Mapping) and spec.get("on_error") == "reweight"}
        return CombinedReward(sources, reweight=reweight)
    except BaseException:
        for source in sources:  # stop children / connections already started
            source.close()
        raise
