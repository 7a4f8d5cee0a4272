"""The one parser of tool calls in an assistant turn, and the text of tool results.

A call is a Hermes / Qwen block, as the chat templates render it:

    <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>

An assistant turn is its text, then one or more such blocks, then the end-of-turn
token.  Anything else that mentions a call (an unclosed block, JSON that does not
parse, a name that is not a string, text after a call) is *malformed*: the parser
says why in `ParsedTurn.errors`, and the episode runner feeds that back to the
policy as an error observation and counts it; it never raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict

    def as_message_part(self) -> dict:
        """The call in the `tool_calls` form transformers' chat templates and trl read."""
        return {"type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}


@dataclass(frozen=True)
class ParsedTurn:
    """One assistant turn: the text before any call, the calls, and what was malformed (empty when well formed)."""

    content: str
    calls: tuple[ToolCall, ...] = ()
    errors: tuple[str, ...] = field(default=())
    raw: str = ""

    @property
    def malformed(self) -> bool:
        return bool(self.errors)

    def as_message(self) -> dict:
        """The conversation message of this turn.

        A malformed turn keeps its raw text as content and no `tool_calls`, so rendering it gives back exactly what
        the policy wrote (the strict re-tokenisation check relies on it).
        """
        if self.malformed or not self.calls:
            return {"role": "assistant", "content": self.raw}
        return {"role": "assistant", "content": self.content, "tool_calls": [c.as_message_part() for c in self.calls]}


def _parse_call(body: str) -> ToolCall | str:
    """A call from the JSON between the tags, or the reason it is not one."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"the call is not valid JSON ({exc.msg} at character {exc.pos})"
    if not isinstance(value, dict):
        return f"the call is a JSON {type(value).__name__}, not an object with 'name' and 'arguments'"
    unknown = sorted(set(value) - {"name", "arguments"})
    if unknown:
        return f"the call has unknown keys {unknown}; a call is {{\"name\": ..., \"arguments\": {{...}}}}"
    if not isinstance(value.get("name"), str) or not value["name"]:
        return "the call has no 'name' string"
    if "arguments" not in value:
        return f"the call to {value['name']!r} has no 'arguments' object (write \"arguments\": {{}} for none)"
    arguments = value["arguments"]
    if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"the arguments of {value['name']!r} are a string that is not JSON"
    if not isinstance(arguments, dict):
        return f"the arguments of {value['name']!r} are a JSON {type(arguments).__name__}, not an object"
    return ToolCall(value["name"], arguments)


def parse_assistant(text: str, end_of_turn: str | None = None) -> ParsedTurn:
    """Split an assistant turn into its text and its calls (see the module docstring).

    ``end_of_turn``: the token text that closes the turn (the tokenizer's EOS), removed from the end first.
    """
    raw = text[: -len(end_of_turn)] if end_of_turn and text.endswith(end_of_turn) else text
    first = raw.find(OPEN)
    stray_close = raw.find(CLOSE)
    if first < 0:
        if stray_close >= 0:
            return ParsedTurn(raw, (), (f"{CLOSE} without an opening {OPEN}",), raw)
        return ParsedTurn(raw, (), (), raw)
    content, rest = raw[:first], raw[first:]
    calls, errors = [], []
    while rest:
        if not rest.startswith(OPEN):
            errors.append(f"text after a tool call: {rest[:40]!r} (a turn is text, then its calls, then the end)")
            break
        end = rest.find(CLOSE)
        if end < 0:
            errors.append(f"{OPEN} is not closed by {CLOSE}")
            break
        call = _parse_call(rest[len(OPEN):end].strip())
        if isinstance(call, str):
            errors.append(call)
        else:
            calls.append(call)
        rest = rest[end + len(CLOSE):]
    return ParsedTurn(content, tuple(calls), tuple(errors), raw)


def result_text(result) -> str:
    """A tool's return value as the text of its `tool` turn: strings as they are, anything else as JSON."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)


def error_text(message: str) -> str:
    """The observation that tells the policy its call failed (malformed, unknown tool, raised, timed out)."""
    return json.dumps({"error": message}, ensure_ascii=False)
