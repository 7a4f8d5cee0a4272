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
    """What stages render from a data file: each prompt with the generation prompt (RL, evaluation), and the prompt
    followed by each answer without it (SFT, reward model, DPO)."""
    prompts, full = [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        prompts.append(row["prompt"])
        full += [row["prompt"] + row[answer] for answer in ("completion", "chosen", "rejected") if answer in row]
    return prompts, full


@pytest.mark.parametrize("name", DATA)
def test_existing_data_renders_byte_identically(name, repo_root):
    from transformers.utils.chat_template_utils import render_jinja_template

    prompts, full = conversations(repo_root / "data/tiny_arith" / name)
    assert len(prompts) >= 500
    for convs, generation_prompt in ((prompts, True), (full, False)):
        if not convs:
            continue
        before = render_jinja_template(convs, chat_template=TEMPLATE_BEFORE_TOOLS, return_assistant_tokens_mask=True,
                                       add_generation_prompt=generation_prompt)
        now = render_jinja_template(convs, chat_template=CHAT_TEMPLATE, return_assistant_tokens_mask=True,
                                    add_generation_prompt=generation_prompt)
        assert now[0] == before[0]
        assert now[1] == before[1]  # the assistant spans SFT trains on are the same characters


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
