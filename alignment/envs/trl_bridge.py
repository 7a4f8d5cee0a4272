"""The same environments under trl's GRPOTrainer, through its own `environment_factory` / `tools`.

trl drives an environment through tools only: it calls ``reset(**row)``,
exposes every public method as a tool, and calls ``get_reward()`` at the end.
What trl does not do is refused here, clearly, rather than half done:
``step(action)`` (turn rewards, a game move), and a chat template that is not
prefix-preserving with ``strict`` on (trl would swap in a template of its own).

Two things are added to trl's loop, both through its public seams:

- each tool runs under the environment's ``tool_timeout`` (a wrapper class
  around the environment; trl sees the same names, signatures and docstrings);
- trl parses completions with ``tokenizer.parse_response``; on this tokenizer
  instance that is our parser (alignment.envs.tool_calls), so trl and our
  episode runner read a turn the same way, and a malformed call becomes a call
  to no tool whose name says what was wrong: trl answers it with an error
  observation and counts it in ``tools/failure_frequency``.
"""

from __future__ import annotations

import functools
import inspect

from alignment.envs.base import EnvError, EnvironmentSpec, ToolBox, call_with_timeout, load_factory, tools_of
from alignment.envs.tool_calls import parse_assistant

# A transformers response template (saved with the tokenizer, transformers >= 5.13) for the Hermes/Qwen blocks our
# templates render, so a saved checkpoint parses its own tool calls with plain transformers as well.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True,
                       "content": "json", "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}
INVALID_CALL = "invalid_tool_call"


class MalformedCount:
    """Malformed calls seen by the parser during a trl run (trl's own counters know only failed calls)."""

    def __init__(self):
        self.count = 0


def trl_message(tokenizer, ids, counter: MalformedCount | None = None) -> dict:
    """One completion as trl's parsed message, by our parser (a malformed turn calls no tool; see module doc)."""
    text = ids if isinstance(ids, str) else tokenizer.decode(list(ids), skip_special_tokens=False)
    parsed = parse_assistant(text, tokenizer.eos_token)
    if parsed.malformed:
        if counter is not None:
            counter.count += 1
        reason = "; ".join(parsed.errors)
        return {"role": "assistant", "content": parsed.raw,
                "tool_calls": [{"type": "function", "function": {"name": f"{INVALID_CALL} ({reason})",
                                                                 "arguments": {}}}]}
    return parsed.as_message()


def install_parser(tokenizer) -> MalformedCount:
    """Make trl read completions with our parser on this tokenizer instance (nothing else changes)."""
    counter = MalformedCount()
    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        tokenizer.response_template = RESPONSE_TEMPLATE  # trl only asks that one be set; ours does the parsing

    def parse_response(response, *args, prefix=None, tools=None, **kwargs):
        return trl_message(tokenizer, response, counter)

    tokenizer.parse_response = parse_response
    return counter


def timed(tool, timeout: float, name: str | None = None):
    """``tool`` with a time limit, keeping its name, signature and docstring (trl reads them for the schema)."""

    @functools.wraps(tool)
    def call(*args, **kwargs):
        arguments = inspect.signature(tool).bind(*args, **kwargs).arguments
        outcome = call_with_timeout(tool, dict(arguments), timeout)
        if not outcome.ok:
            raise RuntimeError(outcome.error)
        return outcome.value

    return call


def environment_class(factory, timeout: float):
    """A class trl's ``environment_factory`` builds: the environment's tools as methods under the time limit."""
    probe = factory()
    names = list(tools_of(probe))

    def method(name):
        original = getattr(type(probe), name)

        @functools.wraps(original)
        def call(self, *args, **kwargs):
            return timed(getattr(self._env, name), timeout)(*args, **kwargs)

        return call

    def __init__(self):
        self._env = factory()

    def reset(self, **row):
        return self._env.reset(**row)

    namespace = {"__init__": __init__, "reset": reset, "__doc__": type(probe).__doc__,
                 **{name: method(name) for name in names}}
    if callable(getattr(probe, "get_reward", None)):
        namespace["get_reward"] = lambda self: float(self._env.get_reward())
    return type(type(probe).__name__, (), namespace)


def trl_arguments(spec: EnvironmentSpec, tokenizer) -> dict:
    """The keyword arguments for trl's GRPOTrainer (``environment_factory`` or ``tools``), or an EnvError saying
    what trl cannot drive."""
    from trl.chat_template_utils import is_chat_template_prefix_preserving

    factory = load_factory(spec)
    probe = factory()
    name = type(probe).__name__
    if callable(getattr(probe, "step", None)):
        raise EnvError(f"environment {spec.source!r}: {name} defines step(action), which trl's GRPOTrainer does not "
                       "call (it drives environments through tools only): drop step() and expose tools, or use our "
                       "episode runner (alignment.envs.run_episode)")
    if spec.strict and not is_chat_template_prefix_preserving(tokenizer):
        raise EnvError(f"environment {spec.source!r}: the tokenizer's chat template is not prefix-preserving, so trl "
                       "would train on a template of its own instead (environment.strict: true refuses that; set it "
                       "false to accept trl's)")
    if isinstance(probe, ToolBox):
        return {"tools": [timed(tool, spec.tool_timeout) for tool in tools_of(probe).values()]}
    return {"environment_factory": environment_class(factory, spec.tool_timeout)}
