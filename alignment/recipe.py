"""Recipes: one YAML file per stage, loaded into frozen, typed objects.

    recipe = load("recipes/tiny/sft.yaml", overrides=["train.learning_rate=1e-3"])

Top-level sections: ``stage``, ``model``, ``data``, ``reward`` (stages that
score), ``train`` (handed to the stage's trainer config, e.g. trl's
``SFTConfig``), ``options`` (the stage's own settings), ``eval``,
``output_dir``, ``seed``, ``resume``, ``overwrite``.  Every unknown key, wrong type or value
out of range is a :class:`RecipeError` naming the file, the line, the key and
the closest valid key.  Nothing heavy (no model, no trl trainer) is built here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from alignment.envs.base import EnvironmentSpec
from alignment.errors import RecipeError, RewardError
from reward import combine as reward_combine

SECRET_MARKERS = ("token", "api_key", "apikey", "secret", "password", "authorization", "cookie")
SECRET_EXCEPTIONS = ("token_env", "max_tokens", "max_new_tokens", "pad_token", "eos_token", "bos_token")


def positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def fraction(value) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def check(rule):
    """Field metadata attaching a range rule (a function returning an error text or None)."""
    return {"check": rule}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapter settings (peft): set `model.lora` to train an adapter instead of every weight."""

    r: int = field(default=16, metadata=check(positive))
    alpha: int = field(default=32, metadata=check(positive))
    dropout: float = field(default=0.0, metadata=check(fraction))
    target_modules: Union[str, list] = "all-linear"


@dataclass(frozen=True)
class ModelSpec:
    name_or_path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora: Union[LoraSpec, None] = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attn_implementation: Union[str, None] = None
    # QLoRA: load the weights 4-bit (NF4) or 8-bit through bitsandbytes and train a LoRA adapter on top;
    # needs model.lora, a CUDA GPU and bitsandbytes (pip install -e '.[gpu]'), checked when the stage runs.
    quantization: Union[Literal["4bit", "8bit"], None] = None


@dataclass(frozen=True)
class DataSpec:
    train: str
    eval: Union[str, None] = None
    eval_fraction: float = field(default=0.0, metadata=check(fraction))
    split: str = "train"
    max_samples: Union[int, None] = field(default=None, metadata=check(positive))
    max_prompt_tokens: Union[int, None] = field(default=None, metadata=check(positive))
    max_dropped_fraction: float = field(default=0.05, metadata=check(fraction))
    # SFT: rows whose trained tokens hold no EOS / end-of-turn token are an error (the model would never learn
    # to stop); set true only when the data is meant to be continued (e.g. truncated documents).
    allow_missing_eos: bool = False


# The keys of a reward spec live with reward.build, which takes them (reward/ imports nothing from alignment/)
RewardSpec = reward_combine.RewardSpec


def checked_rewards(value: list, keys: tuple, locations: Locations) -> list:
    """A reward list kept as written (evaluation hands it to reward.build), once each entry passes as a RewardSpec."""
    reward_specs(value, keys, locations)
    return value


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation run at the end of a stage (and by `align eval`; every N steps with every_steps)."""

    data: Union[str, None] = None
    max_samples: Union[int, None] = field(default=None, metadata=check(positive))
    max_new_tokens: int = field(default=8, metadata=check(positive))
    batch_size: int = field(default=250, metadata=check(positive))
    temperature: float = field(default=1.0, metadata=check(positive))
    sampled: bool = True
    seed: int = 0
    rewards: list = field(default_factory=lambda: [{"source": "answer_match"}], metadata={"build": checked_rewards})
    # During training: the same quick metrics every this many optimizer (or PPO) steps, logged to
    # metrics.jsonl as eval/<metric>; on at most `during_max_samples` prompts (default: max_samples).
    every_steps: Union[int, None] = field(default=None, metadata=check(positive))
    during_max_samples: Union[int, None] = field(default=None, metadata=check(positive))
    # Used by `align eval` (ignored by the quick check at the end of a stage):
    judge: Union[str, None] = None  # reward source that decides win rates (default: the first one)
    perplexity: bool = True  # perplexity of the reference completions (`completion` column), when present
    text_metrics: bool = True  # BLEU and ROUGE against the reference completions, when present
    preference_data: Union[str, None] = None  # held-out pairs for reward-model checkpoints
    report_samples: int = field(default=10, metadata=check(non_negative))
    bootstrap_resamples: int = field(default=1000, metadata=check(positive))
    # `align eval` only: play every policy checkpoint in this environment (greedy episodes, max_new_tokens per
    # turn); a checkpoint whose own recipe.yaml names an environment is played in that one
    environment: Union[EnvironmentSpec, None] = None

    def __post_init__(self):
        """Refuse a mid-run check with nothing to check on, rather than silently logging nothing."""
        if self.every_steps is not None and not self.data:
            raise ValueError("eval.every_steps needs eval.data (the held-out prompts)")


@dataclass(frozen=True)
class Recipe:
    stage: str
    model: ModelSpec
    data: DataSpec
    output_dir: str
    train: Mapping = field(default_factory=dict)
    options: Mapping = field(default_factory=dict)
    reward: tuple = ()
    eval: Union[EvalSpec, None] = None
    environment: Union[EnvironmentSpec, None] = None  # multi-turn episodes with tools (docs/environments.md)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # mixed precision of every stage (alignment/precision.py)
    resume: Union[bool, Literal["force"]] = False  # "force": resume even if data/seed/hyper-parameters changed
    overwrite: bool = False  # a fresh start may replace a finished run in output_dir (`align run --overwrite`)
    source_path: Union[str, None] = None
    raw: Mapping = field(default_factory=dict, repr=False)

    def resolved_yaml(self) -> str:
        """The recipe as run (overrides applied), with secret-looking values redacted."""
        return yaml.safe_dump(redact(thaw(self.raw)), sort_keys=False)

    def __repr__(self) -> str:
        """Like the dataclass repr, with secret-looking values (tokens, API keys, URL passwords) redacted."""
        parts = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if isinstance(value, (Mapping, tuple)):
                value = redact(thaw(value))
            elif isinstance(value, str):
                value = redact(value)
            parts.append(f"{f.name}={value!r}")
        return f"Recipe({', '.join(parts)})"


TOP_LEVEL_KEYS = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("source_path", "raw")]


# ----------------------------------------------------------------------------- locations


class Locations:
    """Maps a key path such as ("train", "learning_rate") to where it was written."""

    def __init__(self, path: str):
        self.path = path
        self.lines: dict[tuple, str] = {}

    def where(self, keys: tuple) -> str:
        while keys:
            if keys in self.lines:
                return self.lines[keys]
            keys = keys[:-1]
        return self.path

    def error(self, keys: tuple, message: str) -> RecipeError:
        dotted = ".".join(str(k) for k in keys)
        return RecipeError(f"{self.where(keys)}: {dotted}: {message}" if dotted else f"{self.where(keys)}: {message}")


def _record_lines(node, keys: tuple, locations: Locations) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = keys + (key_node.value,)
            locations.lines[child] = f"{locations.path}:{key_node.start_mark.line + 1}"
            _record_lines(value_node, child, locations)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = keys + (index,)
            locations.lines[child] = f"{locations.path}:{item.start_mark.line + 1}"
            _record_lines(item, child, locations)


def read_yaml(path: str | Path) -> tuple[dict, Locations]:
    """Parse a YAML file and remember the line of every key."""
    path = str(path)
    locations = Locations(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:  # a directory, no permission, ...
        raise RecipeError(f"{path}: cannot read the recipe file: {exc.strerror or exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise RecipeError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    try:
        _check_plain(data)
        _record_lines(node, (), locations)
    except RecursionError:
        raise RecipeError(f"{path}: invalid YAML: recursive (an alias inside itself) or nested too deeply") from None
    return data, locations


def _check_plain(value, depth: int = 0) -> None:
    """Refuse self-referencing anchors (`a: &x [*x]`) and absurd nesting, which no recipe needs."""
    if depth > 100:
        raise RecursionError
    if isinstance(value, dict):
        for item in value.values():
            _check_plain(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_plain(item, depth + 1)


# ----------------------------------------------------------------------------- overrides


def _set_dotted(data: dict, keys: tuple, value, override: str) -> None:
    """data[k1][k2]... = value; a number indexes an existing list (`reward.0.source=...`), else dicts are made."""
    target = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(target, list):
            if not key.isdigit() or int(key) >= len(target):
                raise RecipeError(f"command-line override {override!r}: {'.'.join(keys[:depth])} is a list of "
                                  f"{len(target)}; use an index 0..{len(target) - 1}")
            key = int(key)
        elif not isinstance(target, dict):
            raise RecipeError(f"command-line override {override!r}: {'.'.join(keys[:depth])} is not a mapping")
        if last:
            target[key] = value
        else:
            if isinstance(target, dict) and not isinstance(target.get(key), (dict, list)):
                target[key] = {}
            target = target[key]


def apply_overrides(data: dict, overrides: list[str], locations: Locations) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw recipe dict."""
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"override {override!r} is not of the form key.sub=value")
        dotted, _, text = override.partition("=")
        keys = tuple(dotted.strip().split("."))
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(data, keys, value, override)
        shown = f"{dotted}=***" if any(is_secret_key(k) for k in keys) else override
        for depth in range(1, len(keys) + 1):
            locations.lines[keys[:depth]] = f"command-line override {shown!r}"
    return data


# ----------------------------------------------------------------------------- typed building


def did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(map(str, valid)))}"


def check_unknown_keys(data: Mapping, valid, keys: tuple, locations: Locations, section: str) -> None:
    for key in data:
        if key not in valid:
            raise locations.error(keys + (key,), f"unknown key {key!r} in {section}{did_you_mean(key, valid)}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _yaml11_float(text: str):
    """PyYAML reads `1e-4` (no dot) as a string; accept it where a number is expected."""
    try:
        return float(text)
    except ValueError:
        return text


def _shown(value, keys: tuple) -> str:
    """How a value appears in an error message: never the value of a secret-looking key."""
    if keys and is_secret_key(keys[-1]):
        return f"{type(value).__name__} '***'"
    return f"{type(value).__name__} {value!r}"


def coerce(value: Any, hint, keys: tuple, locations: Locations):
    """Check `value` against a type hint and convert it (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, keys, locations)
            except RecipeError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        names = " or ".join(_type_name(o) for o in options)
        raise locations.error(keys, f"expected {names}, got {_shown(value, keys)}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise locations.error(keys, f"must be one of {list(choices)}, got {_shown(value, keys)}"
                                  f"{did_you_mean(value, choices)}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise locations.error(keys, f"expected a mapping of {hint.__name__} keys, got {type(value).__name__}")
        return build_dataclass(hint, value, keys, locations)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise locations.error(keys, f"expected a list, got {_shown(value, keys)}")
        return list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise locations.error(keys, f"expected a mapping, got {_shown(value, keys)}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise locations.error(keys, f"expected true or false, got {_shown(value, keys)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise locations.error(keys, f"expected an integer, got {_shown(value, keys)}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise locations.error(keys, f"expected a number, got {_shown(value, keys)}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise locations.error(keys, f"must be a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise locations.error(keys, f"expected a string, got {_shown(value, keys)}")
        return value
    return value


def build_dataclass(cls, data: Mapping, keys: tuple, locations: Locations):
    """Build dataclass `cls` from a mapping: unknown keys, missing keys, types and ranges checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    section = ".".join(map(str, keys)) or "the recipe"
    check_unknown_keys(data, fields, keys, locations, section)
    values = {}
    for name, spec in fields.items():
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise locations.error(keys, f"missing required key {name!r} in {section}")
            continue
        value = coerce(data[name], hints[name], keys + (name,), locations)
        build = spec.metadata.get("build")  # a field with sub-structure checked by its own function
        if build is not None:
            value = build(value, keys + (name,), locations)
        rule = spec.metadata.get("check")
        if rule is not None and value is not None:
            problem = rule(value)
            if problem:
                raise locations.error(keys + (name,), f"{problem}, got {value!r}")
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise locations.error(keys, str(exc)) from None


# ----------------------------------------------------------------------------- trainer config sections

# Range rules for common trainer-config keys, checked before any trainer is built.
TRAIN_RULES = {
    "learning_rate": positive,
    "critic_learning_rate": positive,
    "beta": non_negative,
    "per_device_train_batch_size": positive,
    "per_device_eval_batch_size": positive,
    "gradient_accumulation_steps": positive,
    "num_train_epochs": positive,
    "max_steps": lambda v: None if v == -1 or v > 0 else "must be > 0 (or -1 for epochs)",
    "warmup_ratio": fraction,
    "weight_decay": non_negative,
    "max_grad_norm": non_negative,
    "num_generations": lambda v: None if v >= 2 else "must be >= 2 (advantages compare samples of a group)",
    "temperature": positive,
    "max_length": positive,
    "max_completion_length": positive,
    "batch_size": positive,
    "mini_batch_size": positive,
}


def _hints_one_by_one(config_class) -> tuple[dict[str, Any], dict[str, str]]:
    """(resolvable hints, {field: why not}) of a class whose hints do not all resolve together.

    Each annotation is evaluated alone, in the module of the class that declares it, so one hint that
    needs a missing optional package costs the check of that field only, not of every field.
    """
    hints, unresolved = {}, {}
    for base in reversed(config_class.__mro__):
        for name, annotation in base.__dict__.get("__annotations__", {}).items():
            holder = type("_OneHint", (), {"__annotations__": {name: annotation}, "__module__": base.__module__})
            try:
                hints[name] = typing.get_type_hints(holder)[name]
                unresolved.pop(name, None)
            except Exception as exc:  # noqa: BLE001 - any failure to evaluate a hint
                hints.pop(name, None)
                unresolved[name] = f"{type(exc).__name__}: {exc}"
    return hints, unresolved


def config_fields(config_class) -> dict[str, Any]:
    """Field name -> type hint of a dataclass config (trl's SFTConfig, our PPOConfig, ...).

    A hint that cannot be evaluated (trl configs may name types of optional packages) leaves that field
    unchecked, with a warning naming it; it never switches the type checks of the other fields off.
    """
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # noqa: BLE001 - fall back to resolving hints one by one
        hints, unresolved = _hints_one_by_one(config_class)
        if unresolved:
            import warnings

            shown = "; ".join(f"{name} ({why})" for name, why in sorted(unresolved.items()))
            warnings.warn(f"{config_class.__name__}: the type hints of {shown} cannot be resolved, so these "
                          "train keys are not type-checked (every other key is)", RuntimeWarning, stacklevel=2)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_class) if f.init}


def _simple(hint):
    """The plain type of a hint when it is int/float/bool/str or Optional of one; else None."""
    if hint in (int, float, bool, str):
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float, bool, str):
            return Union[args[0], None]
    return None


def train_choices(config_class, declared: Mapping | None = None) -> dict[str, tuple]:
    """`train:` key -> valid values: the `choices` a config declares (trl's field metadata), and the stage's own
    lists (`StageSpec.train_choices`) for keys whose config declares none."""
    choices = {f.name: tuple(f.metadata["choices"]) for f in dataclasses.fields(config_class)
               if "choices" in f.metadata}
    return {**choices, **dict(declared or {})}


def check_choice(name: str, value, choices: tuple, keys: tuple, locations: Locations) -> None:
    """A string (or each string of a list: DPO combines losses) must be one of `choices`."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, str) and item not in choices:
            close = difflib.get_close_matches(item, choices, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise locations.error(keys + (name,), f"must be one of {list(choices)}, got {item!r}{hint}")


def build_own_config(config_class, train: Mapping, locations: Locations, keys=("train",)) -> None:
    """Build our own trainer config (PPOConfig) now, so every value it refuses is refused at load, at its key.

    Its checks live in its __post_init__ (one home), and building it is cheap and loads nothing.  trl's configs
    are not built here: TrainingArguments.__post_init__ probes devices and the accelerate state.
    """
    if config_class.__module__.partition(".")[0] != "alignment":
        return
    try:
        config_class(**train)
    except ValueError as exc:
        key = getattr(exc, "key", None)  # alignment.ppo.config.SettingError names the setting
        raise locations.error(keys + ((key,) if key else ()), str(exc)) from None


def validate_train_section(train: Mapping, config_class, locations: Locations, keys=("train",),
                           declared_choices: Mapping | None = None) -> dict:
    """Unknown keys, plain types, choices and ranges of the `train:` section against the trainer's config."""
    fields = config_fields(config_class)
    choices = train_choices(config_class, declared_choices)
    check_unknown_keys(train, fields, keys, locations, f"train ({config_class.__name__})")
    checked = {}
    for name, value in train.items():
        hint = _simple(fields[name])
        if hint is not None:
            value = coerce(value, hint, keys + (name,), locations)
        rule = TRAIN_RULES.get(name)
        if rule is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = rule(value)
            if problem:
                raise locations.error(keys + (name,), f"{problem}, got {value!r}")
        if name in choices:
            check_choice(name, value, choices[name], keys, locations)
        checked[name] = value
    check_generation_batch(checked, config_class, locations, keys)
    build_own_config(config_class, checked, locations, keys)
    return checked


def _config_default(config_class, name: str):
    for f in dataclasses.fields(config_class):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def check_generation_batch(train: Mapping, config_class, locations: Locations, keys=("train",)) -> None:
    """Group-based trainers (GRPO, RLOO): one generation batch must hold whole groups of `num_generations`.

    The batch is per_device_train_batch_size x processes (WORLD_SIZE, 1 when not
    launched) x steps_per_generation (default: gradient_accumulation_steps), or
    `generation_batch_size` when set.
    """
    names = {f.name for f in dataclasses.fields(config_class)}
    if "num_generations" not in names or "per_device_train_batch_size" not in names:
        return

    def get(name):
        value = train.get(name, _config_default(config_class, name))
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    groups = get("num_generations")
    if groups is None:
        return
    try:
        processes = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    if get("generation_batch_size") is not None:
        batch, how, key = get("generation_batch_size"), "generation_batch_size", "generation_batch_size"
    else:
        per_device = get("per_device_train_batch_size") or 1
        steps_name = "steps_per_generation" if get("steps_per_generation") is not None else "gradient_accumulation_steps"
        steps = get(steps_name) or 1
        batch = per_device * processes * steps
        how = (f"per_device_train_batch_size ({per_device}) x processes ({processes}) x {steps_name} ({steps})")
        key = "num_generations" if "num_generations" in train else "per_device_train_batch_size"
    if batch % groups:
        raise locations.error(keys + (key,), f"{how} = {batch} completions per generation batch, which is not "
                                             f"divisible by num_generations ({groups}): every prompt needs a whole "
                                             "group of completions")


# ----------------------------------------------------------------------------- entry points


def _freeze(value):
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value):
    """Plain dicts and lists from a recipe's frozen mappings and tuples (for libraries that copy or pickle them)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def is_secret_key(key: str) -> bool:
    key = str(key).lower()
    return any(m in key for m in SECRET_MARKERS) and key not in SECRET_EXCEPTIONS and not key.endswith("_env")


URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@/\s]+@")
# ?token=..., &api_key=... in a URL (the parameter names of SECRET_MARKERS, and the usual short ones)
URL_SECRET_PARAMETER = re.compile(r"(?i)(?P<head>[?&;](?:[a-z0-9_-]*(?:token|api_?key|secret|password)[a-z0-9_-]*"
                                  r"|key|sig|signature|auth)=)[^&#\s'\"]+")
# an Authorization header, written as "Authorization: Bearer x" or {"Authorization": "Bearer x"}
AUTHORIZATION = re.compile(r"(?i)(?P<head>\b(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?(?:bearer\s+|basic\s+|token\s+)?)"
                           r"[^\s'\",}]+")
BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)[A-Za-z0-9._~+/=-]{6,}")

# Secret values known to this process (the variables `token_env` names), scrubbed from text by value:
# a key name says nothing when the value turns up in a URL, an error message or a log line.
SECRET_VALUES: set[str] = set()


def register_secret_value(value: str | None) -> None:
    """Scrub `value` from every redacted text from now on (values under 4 characters would hit innocent text)."""
    if isinstance(value, str) and len(value) >= 4:
        SECRET_VALUES.add(value)
        install_log_redaction()


def register_token_env_values(data) -> None:
    """Register the values of the environment variables that `token_env` keys of a raw recipe name."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key == "token_env" and isinstance(value, str):
                register_secret_value(os.environ.get(value))
            else:
                register_token_env_values(value)
    elif isinstance(data, (list, tuple)):
        for item in data:
            register_token_env_values(item)


def redact_text(text: str) -> str:
    """A text with URL passwords and secret parameters, Authorization / Bearer values and every registered
    secret value replaced by '***'."""
    for pattern in (URL_PASSWORD, URL_SECRET_PARAMETER, AUTHORIZATION, BEARER):
        mask = "***@" if pattern is URL_PASSWORD else "***"  # a URL password keeps its '@' before the host
        text = pattern.sub(lambda m, mask=mask: m.group("head") + mask, text)
    for secret in sorted(SECRET_VALUES, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact(value):
    """Values of secret-looking keys as '***', and every string through :func:`redact_text`."""
    if isinstance(value, Mapping):
        return {k: ("***" if is_secret_key(k) and isinstance(v, str) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def install_log_redaction() -> None:
    """Every log record's message goes through :func:`redact_text` (once per process).

    A record factory rather than a handler filter: it covers every logger and handler, including ones
    libraries add later.
    """
    import logging

    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacts_secrets", False):  # installed already: logging holds it, not a flag of ours
        return

    def redacted_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: leave it to logging to report
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return record

    redacted_record.redacts_secrets = True
    logging.setLogRecordFactory(redacted_record)


def _section(data: Mapping, name: str, empty):
    """An optional section: absent or `null` is empty; anything else is type-checked by the caller."""
    value = data.get(name)
    return empty if value is None else value


# Stages whose saving does not yet merge a QLoRA adapter into a full-precision base (it would be re-quantized).
QUANTIZATION_UNSUPPORTED = {"reward_model": "its final merge would re-quantize the classifier"}


def check_quantization(stage: str, model: ModelSpec, locations: Locations) -> None:
    """What `model.quantization` needs from the recipe itself (the GPU and bitsandbytes are checked at run time).

    Quantized weights cannot be trained, so it needs a LoRA adapter to train; a `tiny:` model is built in
    memory, never loaded, so there is nothing to quantize.
    """
    if model.quantization is None:
        return
    if stage in QUANTIZATION_UNSUPPORTED:
        raise locations.error(("model", "quantization"), f"not supported for the {stage} stage yet "
                              f"({QUANTIZATION_UNSUPPORTED[stage]}); remove it to train in full precision")
    if model.lora is None:
        raise locations.error(("model", "quantization"), f"{model.quantization} needs model.lora: quantized weights "
                              "cannot be trained, so a quantized model is fine-tuned through a LoRA adapter (QLoRA); "
                              "add model.lora, or remove model.quantization to train every weight")
    if model.name_or_path.startswith("tiny:"):
        raise locations.error(("model", "quantization"), "tiny: models are built in memory, not loaded from "
                              "weights; quantize a checkpoint directory or a hub id")


def from_dict(data: dict, locations: Locations) -> Recipe:
    """Validate a raw recipe dict (already overridden) into a frozen :class:`Recipe`."""
    from alignment.stages import stage_spec

    register_token_env_values(data)  # first: every later message, log line and saved file is scrubbed by value

    check_unknown_keys(data, TOP_LEVEL_KEYS, (), locations, "the recipe")
    for required in ("stage", "model", "data", "output_dir"):
        if required not in data:
            raise locations.error((), f"missing required section {required!r}")
    stage = coerce(data["stage"], str, ("stage",), locations)
    spec = stage_spec(stage, locations)
    model = coerce(data["model"], ModelSpec, ("model",), locations)
    check_quantization(stage, model, locations)
    data_spec = coerce(data["data"], DataSpec, ("data",), locations)
    try:
        config_class, options_class = spec.config_class(), spec.options_class()
    except (ImportError, AttributeError) as exc:
        raise locations.error(("stage",), f"stage {stage!r} is not available here: {exc}") from None
    train_raw = coerce(_section(data, "train", {}), dict, ("train",), locations)
    train = validate_train_section(train_raw, config_class, locations, declared_choices=spec.train_choices)
    options_raw = coerce(_section(data, "options", {}), dict, ("options",), locations)
    options = dataclasses.asdict(build_dataclass(options_class, options_raw, ("options",), locations))
    rewards_raw = coerce(_section(data, "reward", []), list, ("reward",), locations)
    rewards = tuple(dataclasses.asdict(spec) for spec in reward_specs(rewards_raw, ("reward",), locations))
    if spec.needs_reward and not rewards:
        raise locations.error(("reward",), f"stage {stage!r} scores completions: list at least one reward source")
    eval_spec = coerce(data["eval"], EvalSpec, ("eval",), locations) if data.get("eval") is not None else None
    environment = checked_environment(stage, data.get("environment"), locations)
    return Recipe(
        stage=stage,
        model=model,
        data=data_spec,
        output_dir=coerce(data["output_dir"], str, ("output_dir",), locations),
        train=_freeze(train),
        options=_freeze(options),
        reward=_freeze(list(rewards)),
        eval=eval_spec,
        environment=environment,
        seed=coerce(data.get("seed", 42), int, ("seed",), locations),
        precision=checked_precision(data, train, locations),
        resume=coerce(data.get("resume", False), Union[bool, Literal["force"]], ("resume",), locations),
        overwrite=coerce(data.get("overwrite", False), bool, ("overwrite",), locations),
        source_path=locations.path,
        raw=_freeze(data),
    )


def checked_precision(data: dict, train: Mapping, locations: Locations) -> str:
    """The top-level `precision:` (auto by default), the one place a run's precision is set: a recipe that also
    sets trl's `train.bf16` / `train.fp16` is refused, naming both keys, rather than one silently winning."""
    value = coerce(data.get("precision", "auto"), Literal["auto", "fp32", "bf16", "fp16"], ("precision",), locations)
    for key in ("bf16", "fp16"):
        if key in train:
            raise locations.error(("train", key), f"train.{key} and precision (default auto) both set the precision; "
                                  f"set `precision: {key}` (or auto, fp32) at the top level and drop train.{key}")
    return value


# Stages that run an `environment:` (grpo: trl's GRPOTrainer through environment_factory; ppo: our loop's
# multi-turn rollouts, alignment/ppo/episodes.py)
ENVIRONMENT_STAGES = ("grpo", "ppo")


def checked_environment(stage: str, raw, locations: Locations) -> Union[EnvironmentSpec, None]:
    """The `environment:` section: its keys, types and ranges, the source's form (and file), and a stage that runs
    environments; the class itself is imported when the stage runs, as reward sources are."""
    if raw is None:
        return None
    spec = coerce(raw, EnvironmentSpec, ("environment",), locations)
    if stage not in ENVIRONMENT_STAGES:
        raise locations.error(("environment",), f"stage {stage!r} does not run environments (yet); stages that do: "
                              f"{', '.join(ENVIRONMENT_STAGES)}")
    return spec


def reward_specs(raw: list, keys: tuple, locations: Locations) -> list[RewardSpec]:
    """Each entry of a reward list (`reward:`, `eval.rewards`) checked as reward.build checks it, without resolving
    the source: its keys, types and ranges (RewardSpec), then which keys apply to which kind of source."""
    specs = []
    for index, entry in enumerate(raw):
        spec = coerce({"source": entry} if isinstance(entry, str) else entry, RewardSpec, keys + (index,), locations)
        try:
            reward_combine.check_key_combination(dataclasses.asdict(spec), index)
        except RewardError as exc:
            raise locations.error(keys + (index,), str(exc)) from None
        specs.append(spec)
    return specs


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    data, locations = read_yaml(path)
    data = apply_overrides(data, list(overrides or []), locations)
    return from_dict(data, locations)


def recipe_files(paths) -> list[Path]:
    """Every recipe file named, or under a named folder (*.yaml / *.yml, sorted)."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.exists():
            found.append(path)
        else:
            raise RecipeError(f"{path}: no such file or folder")
    return found
