"""The one tool-call parser: well-formed turns, and each kind of malformed call named, never raised."""

import pytest

from alignment.envs.tool_calls import ToolCall, error_text, parse_assistant, result_text


def test_text_then_calls():
    turn = parse_assistant('Adding. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
                           '<tool_call>\n{"name": "evaluate", "arguments": {"expression": "3*4"}}\n</tool_call>'
                           "<|im_end|>", "<|im_end|>")
    assert turn.content == "Adding. " and not turn.malformed
    assert turn.calls == (ToolCall("add", {"a": 1, "b": 2}), ToolCall("evaluate", {"expression": "3*4"}))


def test_openai_style_string_arguments():
    turn = parse_assistant('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    assert turn.calls == (ToolCall("add", {"a": 1, "b": 2}),)


def test_plain_answer_has_no_call():
    turn = parse_assistant("42<|im_end|>", "<|im_end|>")
    assert (turn.content, turn.calls, turn.errors) == ("42", (), ())
    assert turn.as_message() == {"role": "assistant", "content": "42"}


@pytest.mark.parametrize("text, error", [
    ('<tool_call>{"name": "add", "arguments": {"a": 1}', "<tool_call> is not closed by </tool_call>"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>', "the call is not valid JSON"),
    ("<tool_call>[1, 2]</tool_call>", "the call is a JSON list"),
    ('<tool_call>{"arguments": {}}</tool_call>', "the call has no 'name' string"),
    ('<tool_call>{"name": "add"}</tool_call>', "the call to 'add' has no 'arguments' object"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "the arguments of 'add' are a JSON list"),
    ('<tool_call>{"name": "add", "arguments": {}, "id": 3}</tool_call>', "the call has unknown keys ['id']"),
    ('<tool_call>{"name": "add", "arguments": {}}</tool_call> and so 3', "text after a tool call: ' and so 3'"),
    ('3 </tool_call>', "</tool_call> without an opening <tool_call>"),
])
def test_malformed_calls_say_why(text, error):
    turn = parse_assistant(text)
    assert turn.malformed and turn.errors[0].startswith(error), turn.errors
    # the conversation keeps what the policy wrote, so the template renders it back unchanged
    assert turn.as_message() == {"role": "assistant", "content": text}


def test_result_and_error_texts():
    assert result_text("5") == "5" and result_text(5) == "5" and result_text({"x": [1, "é"]}) == '{"x": [1, "é"]}'
    assert result_text(object).startswith("<class")
    assert error_text('bad "call"') == '{"error": "bad \\"call\\""}'
