"""Reward sources by name: a dict, a decorator, and `resolve` for source strings.

Source strings `resolve` accepts, tried in this order:

=================================  ==============================================
``http://host:port``, ``https://``  a remote scorer (`reward.remote.RemoteReward`)
``package.module:function``         an importable attribute (dotted path allowed)
``path/to/file.py:function``        loaded from a file, path relative to the cwd
``answer_match``                    a name registered with ``@register``
``path/to/model_dir``               a sequence-classification reward model
=================================  ==============================================

If the attribute found is a class, it is instantiated with the keyword
arguments; if it is a function and keyword arguments are given, they are bound
with `functools.partial`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from reward.errors import RewardError

REGISTRY: dict[str, Any] = {}


def register(name: str, *, replace: bool = False) -> Callable[[Any], Any]:
    """Decorator: make a reward function or class available as ``name``.

    >>> @register("shout")
    ... def shout(prompts, completions, **columns):
    ...     return [float(c.isupper()) for c in completions]
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise RewardError(f"invalid reward name {name!r}: use letters, digits, '_', '.', '-'")

    def decorator(obj: Any) -> Any:
        if not callable(obj):
            raise RewardError(f"cannot register reward '{name}': {type(obj).__name__} is not callable")
        old = REGISTRY.get(name)
        if old is not None and old is not obj and not replace and _qualname(old) != _qualname(obj):
            raise RewardError(f"reward name '{name}' is already registered to {_qualname(old)}")
        REGISTRY[name] = obj
        return obj

    return decorator


def available() -> list[str]:
    """Sorted registered names."""
    _load_builtins()
    return sorted(REGISTRY)


def default_name(source: str) -> str:
    """A short name for logs and metrics, derived from a source string."""
    s = source.strip()
    if s.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        parts = urlsplit(s)
        host = parts.hostname or "remote"
        tag = f"{host}_{parts.port}" if parts.port else host
        return "remote_" + re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    if ":" in s:
        return s.rsplit(":", 1)[1].split(".")[-1]
    if s in REGISTRY:
        return s
    return os.path.basename(os.path.normpath(s)) or s


def resolve(source: str, **kwargs: Any) -> Callable[..., Any]:
    """Turn a source string into a reward callable (see the module docstring).

    Raises `RewardError` for an unknown name (listing the valid ones, with a
    did-you-mean), a missing file/module/attribute, bad keyword arguments, or
    an object that is not callable.
    """
    if not isinstance(source, str) or not source.strip():
        raise RewardError(f"a reward source must be a non-empty string, got {source!r}")
    s = source.strip()
    _load_builtins()

    if s.startswith(("http://", "https://")):
        from reward.remote import RemoteReward

        return _construct(RemoteReward, (s,), kwargs, s)

    if ":" in s:
        target, attr = s.rsplit(":", 1)
        if not attr:
            raise RewardError(
                f"reward source '{s}': name the function after ':' (e.g. 'my_rewards.py:score')"
            )
        if target.endswith(".py") or "/" in target or os.sep in target:
            module = _load_file(target, s)
        else:
            module = _import_module(target, s)
        return _instantiate(_get_attr(module, attr, s), kwargs, s)

    if s in REGISTRY:
        return _instantiate(REGISTRY[s], kwargs, s)

    path = os.path.expanduser(s)
    if os.path.isdir(path):
        from reward.model import RewardModel

        return _construct(RewardModel, (path,), kwargs, s)

    if s.endswith(".py"):
        raise RewardError(f"reward source '{s}': name the function too, as '{s}:function_name'")
    names = available()
    close = difflib.get_close_matches(s, names, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise RewardError(
        f"unknown reward source '{s}'.{hint} Registered names: {', '.join(names)}. "
        "Other forms: 'package.module:function', 'path/to/file.py:function', a reward-model "
        "directory, or an http(s):// URL."
    )


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _load_builtins() -> None:
    import reward.builtin  # noqa: F401 - registers the built-in rules
    import reward.judge  # noqa: F401 - registers "judge"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _import_module(name: str, source: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise RewardError(
                f"reward source '{source}': cannot import module '{name}' (not found on sys.path; "
                "for a file use 'path/to/file.py:function')"
            ) from exc
        raise RewardError(f"reward source '{source}': importing '{name}' failed: {exc}") from exc
    except Exception as exc:
        raise RewardError(
            f"reward source '{source}': importing '{name}' failed: {type(exc).__name__}: {exc}"
        ) from exc


def _load_file(path: str, source: str) -> Any:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise RewardError(f"reward source '{source}': file not found: {path} (looked at {full})")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    digest = hashlib.sha1(full.encode()).hexdigest()[:10]
    modname = f"_reward_file_{stem}_{digest}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, full)
    if spec is None or spec.loader is None:
        raise RewardError(f"reward source '{source}': cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module  # so classes, dataclasses and pickling find the module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[modname]
        raise RewardError(
            f"reward source '{source}': running {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _get_attr(module: Any, attr: str, source: str) -> Any:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise RewardError(
                f"reward source '{source}': '{part}' not found in {getattr(obj, '__name__', obj)}.{hint} "
                f"Callables there: {', '.join(sorted(names)) or 'none'}"
            )
        obj = getattr(obj, part)
    return obj


def _instantiate(obj: Any, kwargs: dict[str, Any], source: str) -> Callable[..., Any]:
    if inspect.isclass(obj):
        return _construct(obj, (), kwargs, source)
    if not callable(obj):
        raise RewardError(f"reward source '{source}' is a {type(obj).__name__}, not a callable")
    if not kwargs:
        return obj
    if not (inspect.isfunction(obj) or inspect.ismethod(obj) or isinstance(obj, functools.partial)):
        raise RewardError(
            f"reward source '{source}' is an instance of {type(obj).__name__}; it takes no kwargs "
            f"(got {sorted(kwargs)}). Register or name the class instead to pass kwargs."
        )
    _check_kwargs(obj, kwargs, source, skip=2)
    bound = functools.partial(obj, **kwargs)
    bound.__name__ = getattr(obj, "__name__", "reward")  # not update_wrapper: keep the partial's signature
    return bound


def _construct(cls: Any, args: tuple, kwargs: dict[str, Any], source: str) -> Any:
    _check_kwargs(cls, kwargs, source, skip=len(args))
    try:
        obj = cls(*args, **kwargs)
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(
            f"reward source '{source}': building {cls.__name__} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(obj):
        raise RewardError(f"reward source '{source}': {cls.__name__} instances are not callable")
    return obj


def _check_kwargs(fn: Any, kwargs: dict[str, Any], source: str, skip: int) -> None:
    """Unknown keyword argument -> RewardError with the accepted names and a did-you-mean."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = [p for p in positional[skip:] if p.kind != p.POSITIONAL_ONLY]
    rest += [p for p in params if p.kind == p.KEYWORD_ONLY]
    accepted = [p.name for p in rest]
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        _check_unknown(kwargs, accepted, source)
    if isinstance(fn, type):  # a class: its required arguments must come from kwargs
        missing = [p.name for p in rest if p.default is p.empty and p.name not in kwargs]
        if missing:
            raise RewardError(
                f"reward source '{source}': missing keyword argument(s) {missing} (give them in 'kwargs')"
            )


def _check_unknown(kwargs: dict[str, Any], accepted: list[str], source: str) -> None:
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RewardError(
                f"reward source '{source}': unknown keyword argument '{key}'.{hint} "
                f"Accepted: {', '.join(accepted) or 'none'}"
            )
