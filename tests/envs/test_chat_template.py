"""The tiny tokenizer's chat template with tool calls: conversations without tools render as before, byte for byte,
and tool calls and results round-trip through the one parser."""

import json

import pytest

from alignment.envs.tool_calls import parse_assistant
from policies.tiny import CHAT_TEMPLATE

# The template the demo checkpoints were trained with, before tool calls (pinned here, as text, on purpose).
TEMPLATE_BEFORE_TOOLS = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
DATA = ["sft.jsonl", "eval.jsonl", "rl_prompts.jsonl", "preference.jsonl", "preference_eval.jsonl",
        "preference_rm.jsonl"]


def conversations(path):
    """Every conversation a stage renders from a data file: prompts alone, and prompt + each answer."""
    for line in path.read_text().splitlines():
        row = json.loads(line)
        yield row["prompt"]
        for answer in ("completion", "chosen", "rejected"):
            if answer in row:
                yield row["prompt"] + row[answer]


@pytest.mark.parametrize("name", DATA)
def test_existing_data_renders_byte_identically(name, repo_root):
    from transformers.utils.chat_template_utils import render_jinja_template

    convs = list(conversations(repo_root / "data/tiny_arith" / name))
    assert len(convs) >= 500
    for generation_prompt in (False, True):
        for template in (TEMPLATE_BEFORE_TOOLS, CHAT_TEMPLATE):
            rendered, marks = render_jinja_template(convs, chat_template=template, return_assistant_tokens_mask=True,
                                                    add_generation_prompt=generation_prompt)
            if template is TEMPLATE_BEFORE_TOOLS:
                before, before_marks = rendered, marks
        assert rendered == before
        assert marks == before_marks  # the assistant spans SFT trains on are the same characters


CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
TWO_CALLS = [CALL, {"type": "function", "function": {"name": "evaluate", "arguments": {"expression": "(2 + 3) * 4"}}}]


def test_tool_calls_and_results_render_as_hermes_blocks_and_tool_turns(tiny_tokenizer):
    conv = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "Let me add.", "tool_calls": [CALL]},
            {"role": "tool", "name": "add", "content": "5"},
            {"role": "assistant", "content": "5"}]
    assert tiny_tokenizer.apply_chat_template(conv, tokenize=False) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>"
        '<|im_start|>assistant\nLet me add.<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        "<|im_end|><|im_start|>tool\n5<|im_end|><|im_start|>assistant\n5<|im_end|>")


def test_tools_open_the_conversation_as_signatures(tiny_tokenizer):
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[add], tokenize=False,
                                                  add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\n<tools>\nadd(a: integer, b: integer)\n</tools><|im_end|>"
                        "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\n")


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "assistant", "content": "Two steps: ", "tool_calls": TWO_CALLS},
    {"role": "assistant", "content": "no call at all"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "echo", "arguments": {"text": "quotes \" and <tags> and ünïcode"}}}]},
])
def test_assistant_turn_round_trip_render_parse_render(tiny_tokenizer, message):
    conv = [{"role": "user", "content": "q"}, message]
    rendered = tiny_tokenizer.apply_chat_template(conv, tokenize=False)
    head = tiny_tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    turn = rendered[len(head):]
    parsed = parse_assistant(turn, tiny_tokenizer.eos_token)
    assert not parsed.malformed
    assert [c.as_message_part() for c in parsed.calls] == message.get("tool_calls", [])
    assert tiny_tokenizer.apply_chat_template(conv[:1] + [parsed.as_message()], tokenize=False) == rendered


def test_tool_results_round_trip(tiny_tokenizer):
    """A tool turn renders its content verbatim (strings as they are, structures as JSON), so parsing the turn back
    out of the text and rendering it again gives the same text."""
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": TWO_CALLS},
            {"role": "tool", "name": "add", "content": "5"},
            {"role": "tool", "name": "evaluate", "content": '{"error": "evaluate: timed out after 1 s"}'}]
    rendered = tiny_tokenizer.apply_chat_template(conv, tokenize=False)
    turns = rendered.split("<|im_start|>")[1:]
    parsed = [{"role": t.split("\n", 1)[0], "content": t.split("\n", 1)[1].removesuffix("<|im_end|>")}
              for t in turns if t.startswith("tool\n")]
    assert [p["content"] for p in parsed] == ["5", '{"error": "evaluate: timed out after 1 s"}']
    again = tiny_tokenizer.apply_chat_template(conv[:2] + parsed, tokenize=False)
    assert again == rendered


def test_trl_accepts_the_template_for_tool_calling(tiny_tokenizer):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, supports_tool_calling

    assert supports_tool_calling(tiny_tokenizer)
    assert is_chat_template_prefix_preserving(tiny_tokenizer)
