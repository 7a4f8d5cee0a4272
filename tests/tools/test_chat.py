"""`align chat` through a pseudo-terminal, the chat session's history and streaming, and `align generate`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from alignment.tools.chat import PROMPT, ChatSession, chat_loop, generate_file


class Recorder:
    """A stream that keeps every write separately (to see that an answer arrives in pieces)."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import policies

    return policies.load(str(tiny_model_dir), dtype="float32", device="cpu")


def align_executable() -> str:
    return str(Path(sys.executable).with_name("align"))


def test_chat_in_a_pseudo_terminal_streams_an_answer_and_exits_on_ctrl_d(tiny_model_dir, tiny):
    from alignment.evaluation.generate import generate_completions

    pexpect = pytest.importorskip("pexpect")
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    expected = generate_completions(*tiny, [question], max_new_tokens=6)[0]["text"]
    assert expected.strip()  # the fixture's model says something visible
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    child = pexpect.spawn(align_executable(), ["chat", str(tiny_model_dir), "--max-new-tokens", "6"],
                          encoding="utf-8", timeout=90, env=env, dimensions=(24, 200))
    try:
        child.expect_exact(PROMPT)
        child.sendline("What is 2 + 3?")
        child.expect_exact("bot> ")
        child.expect_exact(PROMPT)  # the answer streamed, then the prompt again
        assert "".join(child.before.split()) == "".join(expected.split())  # the greedy answer, as generate gives it
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact(PROMPT)
        child.sendeof()  # Ctrl-D
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None


def test_ctrl_c_at_the_prompt_exits_cleanly(tiny_model_dir):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    child = pexpect.spawn(align_executable(), ["chat", str(tiny_model_dir)], encoding="utf-8", timeout=90, env=env)
    try:
        child.expect_exact(PROMPT)
        child.sendintr()  # Ctrl-C
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_answer_is_streamed_in_pieces_and_kept_in_the_history(tiny):
    model, tokenizer = tiny
    out = Recorder()
    session = ChatSession(model, tokenizer, max_new_tokens=12, out=out)
    calls = []
    original = session.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    session.model.generate = spy
    try:
        answer = session.reply("What is 2 + 3?")
        session.reply("And 4 + 4?")
    finally:
        del session.model.generate
    from transformers import TextStreamer

    assert isinstance(calls[0]["streamer"], TextStreamer)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == answer
    streamed = "".join("".join(out.writes).split())
    assert "".join(answer.split()) in streamed  # what was streamed is what was kept
    rendered = tokenizer.decode(calls[1]["input_ids"][0])
    assert "What is 2 + 3?" in rendered and "And 4 + 4?" in rendered  # the history is in the second prompt
    session.reset()
    assert session.messages == []


def test_streamer_writes_tokens_as_they_come(tiny):
    import torch

    from alignment.tools.chat import _streamer_class

    model, tokenizer = tiny
    out = Recorder()
    streamer = _streamer_class()(tokenizer, out)
    streamer.put(torch.tensor([[1, 2]]))  # the prompt: skipped
    for token in tokenizer(" one two three four", add_special_tokens=False)["input_ids"]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(out.writes) == " one two three four\n"
    assert len([w for w in out.writes if w]) >= 3  # word by word, not all at the end


def test_old_turns_are_dropped_when_the_context_is_full(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=200, out=Recorder())
    for i in range(12):
        session.messages += [{"role": "user", "content": f"What is {i} + {i}?"},
                             {"role": "assistant", "content": str(2 * i)}]
    session.messages.append({"role": "user", "content": "What is 1 + 1?"})
    ids = session.prompt_ids()
    assert len(ids) + 200 <= 256
    assert session.messages[0]["role"] == "system" and session.messages[-1]["content"] == "What is 1 + 1?"
    assert len(session.messages) < 26


def test_chat_loop_commands_and_clean_endings(tiny):
    model, tokenizer = tiny

    def reader(lines):
        queue = list(lines)

        def read(prompt):
            item = queue.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item

        return read

    for ending in (EOFError(), KeyboardInterrupt(), "/exit"):
        out = Recorder()
        session = ChatSession(model, tokenizer, max_new_tokens=3, out=out)
        assert chat_loop(session, read=reader(["", "/help", "hello", "/reset", ending]), out=out) == 0
        text = "".join(out.writes)
        assert "commands:" in text and "bot> " in text and "(conversation reset)" in text and "bye" in text
        assert session.messages == []


def test_generate_writes_one_line_per_prompt(tiny_model_dir, tmp_path, repo_root, align):
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in (repo_root / "data/tiny_arith/eval.jsonl").read_text().splitlines()[:5]]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows) + json.dumps({"prompt": "1 + 1 ="}) + "\n")
    output = tmp_path / "out.jsonl"
    assert align("generate", tiny_model_dir, "--prompts", prompts, "--output", output, "--max-new-tokens", "4",
                 "--batch-size", "2") == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(written) == 6 and [w["prompt"] for w in written[:5]] == [r["prompt"] for r in rows]
    assert all(isinstance(w["completion"], str) and w["num_tokens"] <= 4 and "answer" in w for w in written[:5])


def test_generate_is_reproducible_and_batching_does_not_change_greedy(tiny, tmp_path, repo_root):
    model, tokenizer = tiny
    prompts = repo_root / "data/tiny_arith/eval.jsonl"
    small = tmp_path / "p.jsonl"
    small.write_text("".join(prompts.read_text().splitlines(keepends=True)[:6]))
    runs = {}
    for name, kwargs in {"greedy1": dict(batch_size=1), "greedy3": dict(batch_size=3),
                         "sample_a": dict(batch_size=2, temperature=1.0, seed=5),
                         "sample_b": dict(batch_size=2, temperature=1.0, seed=5)}.items():
        generate_file(model, tokenizer, small, tmp_path / f"{name}.jsonl", max_new_tokens=5, **kwargs)
        runs[name] = [json.loads(line)["completion"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert runs["sample_a"] == runs["sample_b"]
    assert runs["greedy1"] == runs["greedy3"] and len(runs["greedy1"]) == 6


def test_ctrl_c_during_an_answer_drops_that_turn(tiny):
    model, tokenizer = tiny
    out = Recorder()
    session = ChatSession(model, tokenizer, max_new_tokens=3, out=out)

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    session.model.generate = interrupted
    try:
        lines = iter(["hello", "/exit"])
        assert chat_loop(session, read=lambda prompt: next(lines), out=out) == 0
    finally:
        del session.model.generate
    assert "(answer interrupted)" in "".join(out.writes) and session.messages == []
