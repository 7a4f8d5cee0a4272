"""The environment contract: what an episode talks to, and how a recipe names one.

An environment is a class built once per episode (``Calculator(**kwargs)``),
then ``reset(**row)`` with the dataset row (its ``prompt`` and every other
column, as trl's ``environment_factory`` does), returning ``None`` or a first
observation that is appended to the last user message.  It is driven through

- **tools**: its public methods other than ``reset``/``step``/``get_reward``,
  typed and documented the way transformers turns a function into a JSON schema
  (``add(a: int, b: int) -> int`` with a Google-style docstring); a plain list of
  functions without state is the simple case (:class:`ToolBox`);
- and/or **step(action) -> (observation, reward, done)**: called with the text
  of an assistant turn that holds no tool call (a game move, a final answer).

Rewards come per turn (``step``'s reward) and/or at the end: ``get_reward()``
when the environment defines it (trl's convention), and the recipe's
``reward:`` sources on the finished conversation, as for any completion.  An
environment knows no trainer; nothing here imports one.

    environment:
      source: examples/envs/calculator.py:Calculator
      kwargs: {}
      max_turns: 4
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

from policies.errors import AlignmentError

RESERVED = ("reset", "step", "get_reward")


class EnvError(AlignmentError):
    """An environment cannot be loaded or built, or breaks its contract (names the source and the method)."""


class RetokenizationError(EnvError):
    """The episode's tokens differ from the chat template's rendering of its conversation (names the turn)."""


def positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


@dataclass(frozen=True)
class EnvironmentSpec:
    """The recipe's `environment:` section (alignment.recipe checks its keys, types and ranges at load)."""

    source: str  # "path/to/file.py:Class" or "package.module:Class" (a class, or a function returning an environment)
    kwargs: dict = field(default_factory=dict)  # passed to the class when each episode's environment is built
    max_turns: int = field(default=4, metadata={"check": positive})  # assistant turns per episode
    tool_timeout: float = field(default=10.0, metadata={"check": positive})  # seconds one tool call may run
    strict: bool = True  # the episode runner's re-tokenisation check (alignment.envs.episode)

    def __post_init__(self):
        problem = source_problem(self.source)
        if problem:
            raise ValueError(f"source: {problem}")


def source_problem(source: str) -> str | None:
    """Why `source` cannot name an environment (checked at recipe load, before any import), or None."""
    target, colon, attr = source.rpartition(":")
    if not colon or not target or not attr:
        return f"{source!r} must be 'path/to/file.py:ClassName' or 'package.module:ClassName'"
    if target.endswith(".py") and not os.path.isfile(os.path.expanduser(target)):
        return f"file not found: {target} (looked at {os.path.abspath(os.path.expanduser(target))})"
    return None


class StepResult(NamedTuple):
    observation: Union[str, None]  # None: nothing to show the policy
    reward: Union[float, None] = None
    done: bool = False


class ToolBox:
    """Plain tools without state, as an environment: ``ToolBox([add, multiply])``."""

    def __init__(self, tools: list[Callable]):
        self._tools = {tool.__name__: tool for tool in tools}

    def reset(self, **row) -> None:
        return None

    def tools(self) -> dict[str, Callable]:
        return dict(self._tools)


def tools_of(env) -> dict[str, Callable]:
    """Name -> callable of an environment's tools (a :class:`ToolBox`'s functions, else its public methods)."""
    if isinstance(env, ToolBox):
        return env.tools()
    return {name: getattr(env, name) for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
            if not name.startswith("_") and name not in RESERVED}


def tool_schemas(env) -> list[dict]:
    """The JSON schemas the chat template renders (transformers' own conversion, so a missing type hint or an
    undocumented argument is refused here, naming the tool, not at the first rendering)."""
    from transformers.utils import get_json_schema

    schemas = []
    for name, tool in tools_of(env).items():
        try:
            schemas.append(get_json_schema(tool))
        except Exception as exc:  # noqa: BLE001 - transformers raises several types for a bad signature
            raise EnvError(f"tool {name!r} of {type(env).__name__}: {exc} (a tool needs a type hint on every "
                           "argument and a Google-style docstring with an Args: section)") from None
    return schemas


def _load_module(target: str, source: str):
    if target.endswith(".py") or "/" in target:
        full = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(full):
            raise EnvError(f"environment source {source!r}: file not found: {target} (looked at {full})")
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
        name = f"_env_file_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:10]}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, full)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so pickling and dataclasses find it
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise EnvError(f"environment source {source!r}: running {target} failed: {type(exc).__name__}: {exc}") \
                from exc
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise EnvError(f"environment source {source!r}: cannot import {target!r}: {exc}") from exc


def load_factory(spec: EnvironmentSpec) -> Callable[[], Any]:
    """A no-argument callable building one environment per episode, checked once now.

    The check builds one instance: it must define ``reset``, and every tool must have a schema (a type hint per
    argument, a docstring): a broken environment fails at the start of a run, naming itself.
    """
    target, _, attr = spec.source.rpartition(":")
    module = _load_module(target, spec.source)
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise EnvError(f"environment source {spec.source!r}: {attr!r} not found; callables there: "
                       f"{', '.join(sorted(names)) or 'none'}")
    cls = getattr(module, attr)
    kwargs = dict(spec.kwargs)

    def factory():
        return cls(**kwargs)

    try:
        probe = factory()
    except TypeError as exc:
        raise EnvError(f"environment source {spec.source!r}: building it with kwargs {kwargs} failed: {exc}") from None
    if not callable(getattr(probe, "reset", None)):
        raise EnvError(f"environment source {spec.source!r}: {type(probe).__name__} has no reset(**row) method")
    if not tools_of(probe) and not callable(getattr(probe, "step", None)):
        raise EnvError(f"environment source {spec.source!r}: {type(probe).__name__} has neither tools (public "
                       "methods) nor a step(action) method: nothing drives it")
    tool_schemas(probe)
    factory.env_class = type(probe)
    return factory


# ----------------------------------------------------------------------------- running one tool call


@dataclass(frozen=True)
class CallOutcome:
    ok: bool
    value: Any = None  # the tool's return value when ok
    error: str = ""  # why not, when not ok
    timed_out: bool = False
    seconds: float = 0.0


def call_with_timeout(fn: Callable, arguments: dict, timeout: float) -> CallOutcome:
    """Run ``fn(**arguments)`` on a daemon thread and wait at most ``timeout`` seconds.

    A thread rather than a process: an environment's tools change its state, which a child process would not
    share.  A call past its limit is *cut*: the episode goes on with an error observation, and the thread is left to
    finish on its own (Python cannot kill a thread; it is a daemon, so it never holds up the exit).  A tool whose
    hang would also hold resources should enforce its own limit (a subprocess with a timeout) inside.
    """
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(**arguments)
        except BaseException as exc:  # noqa: BLE001 - every failure of a tool becomes an observation
            box["error"] = f"{type(exc).__name__}: {exc}"

    started = time.perf_counter()
    thread = threading.Thread(target=target, name=f"tool-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(timeout)
    seconds = time.perf_counter() - started
    if thread.is_alive():
        return CallOutcome(False, error=f"timed out after {timeout:g} s", timed_out=True, seconds=seconds)
    if "error" in box:
        return CallOutcome(False, error=box["error"], seconds=seconds)
    return CallOutcome(True, value=box.get("value"), seconds=seconds)


def bad_arguments(fn: Callable, arguments: dict) -> str | None:
    """Why ``fn`` cannot take ``arguments`` (missing or unknown names), checked before the call runs."""
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as exc:
        return str(exc)
    return None


def spec_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(EnvironmentSpec)]
