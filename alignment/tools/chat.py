"""`align chat` (interactive, streamed) and `align generate` (batch, JSONL in and out).

    align chat runs/tiny/sft                        # talk to a checkpoint in the terminal
    align chat exports/tiny-sft/int8                # an int8 export works too
    align generate runs/tiny/sft --prompts data/tiny_arith/eval.jsonl --output completions.jsonl

`chat` renders the whole conversation with the checkpoint's chat template each
turn and streams the answer token by token (transformers' TextStreamer).
Commands: /reset (forget the conversation), /exit; Ctrl-D quits, Ctrl-C at the
prompt quits, Ctrl-C during an answer stops that answer.  When the conversation
no longer fits the model's context, the oldest turns are dropped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from alignment.errors import DataError

PROMPT = "you> "
HELP = "commands: /reset forgets the conversation, /exit quits (so do Ctrl-D and Ctrl-C)"


# ----------------------------------------------------------------------------- chat


class ChatSession:
    """A conversation with one model: the history, the template, streamed generation."""

    def __init__(self, model, tokenizer, *, system: str | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, out=None):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("this checkpoint's tokenizer has no chat template; `align chat` needs one")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.out = out or sys.stdout
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def context_limit(self) -> int | None:
        limits = [getattr(self.model.config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**8]
        return min(limits) if limits else None

    def prompt_ids(self) -> list[int]:
        """The conversation rendered for generation; the oldest turns dropped until it fits the context."""
        limit = self.context_limit()
        budget = None if limit is None else limit - self.max_new_tokens
        first = 1 if self.system else 0
        while True:
            text = self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if budget is None or len(ids) <= budget:
                return ids
            if len(self.messages) - first > 1:  # earlier turns left: drop the oldest user/assistant pair
                del self.messages[first : first + 2]
                continue
            if budget <= 0:
                raise DataError(f"--max-new-tokens {self.max_new_tokens} leaves no room in the model's "
                                f"{limit}-token context")
            return ids[-budget:]  # the current message alone is too long: keep its end

    def reply(self, user_text: str) -> str:
        """Add the user's turn, stream the answer to `out`, add it to the history, return it."""
        import torch

        self.messages.append({"role": "user", "content": user_text})
        ids = torch.tensor([self.prompt_ids()], device=self.model.device)
        streamer = _streamer_class()(self.tokenizer, self.out)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=pad, eos_token_id=eos, streamer=streamer)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        try:
            with torch.inference_mode():
                output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        except BaseException:
            self.messages.pop()  # an interrupted turn is not part of the conversation
            raise
        answer = self.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def _streamer_class():
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """TextStreamer that writes to a chosen stream, skipping the prompt and special tokens."""

        def __init__(self, tokenizer, out):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.out = out

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.out.write(text + ("\n" if stream_end else ""))
            self.out.flush()

    return Streamer


def chat_loop(session: ChatSession, read=input, out=None) -> int:
    """Read a line, answer it, repeat; /reset, /exit, EOF and Ctrl-C handled. Returns the exit status."""
    out = out or sys.stdout
    out.write(f"chatting with {session.model.config.model_type} model; {HELP}\n")
    out.flush()
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            out.write("\nbye\n")
            return 0
        except KeyboardInterrupt:
            out.write("\nbye\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            out.write("bye\n")
            return 0
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if text in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        out.write("bot> ")
        out.flush()
        try:
            session.reply(text)
        except KeyboardInterrupt:
            out.write("\n(answer interrupted)\n")
        out.flush()


def cmd_chat(args) -> int:
    from alignment.tools.export import load_any

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in an interactive session
    model, tokenizer = load_any(args.checkpoint)
    session = ChatSession(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature)
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    return chat_loop(session)


# ----------------------------------------------------------------------------- generate


def read_prompts(path: Path, field: str):
    """(row, prompt) of each line of a JSONL file, streamed; the prompt is a string or a message list."""
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file")
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from None
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"{path}:{number}: each line needs a {field!r} field (a string or chat messages)")
            yield row, row[field]


def generate_file(model, tokenizer, prompts_path: str | Path, output: str | Path, *, field: str = "prompt",
                  max_new_tokens: int = 64, temperature: float = 0.0, batch_size: int = 16, seed: int = 0) -> int:
    """Write one JSONL line per prompt: the input row plus `completion`, `num_tokens`, `ended_with_eos`.

    Prompts are read and written one batch at a time; batch b is generated with
    seed `seed + b`, exactly as one `generate_completions` call over the whole file would.
    """
    from alignment.evaluation.generate import generate_completions

    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    written = 0
    batch: list[tuple[dict, object]] = []

    def flush(handle, batch_index: int) -> int:
        samples = generate_completions(
            model, tokenizer, [p for _, p in batch], max_new_tokens=max_new_tokens, batch_size=batch_size,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0, seed=seed + batch_index,
        )
        for (row, _), sample in zip(batch, samples):
            record = {**row, "completion": sample["text"], "num_tokens": sample["num_tokens"],
                      "ended_with_eos": sample["ended_with_eos"]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return len(samples)

    with tmp.open("w", encoding="utf-8") as handle:
        batches = 0
        for item in read_prompts(Path(prompts_path), field):
            batch.append(item)
            if len(batch) == batch_size:
                written += flush(handle, batches)
                batches += 1
                batch = []
        if batch:
            written += flush(handle, batches)
    if written == 0:
        tmp.unlink()
        raise DataError(f"{prompts_path}: no prompts")
    os.replace(tmp, output)
    return written


def cmd_generate(args) -> int:
    from alignment.tools.export import load_any

    model, tokenizer = load_any(args.checkpoint)
    n = generate_file(model, tokenizer, args.prompts, args.output, field=args.prompt_field,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=args.batch_size,
                      seed=args.seed)
    mode = f"sampled at temperature {args.temperature}" if args.temperature > 0 else "greedy"
    print(f"{n} completions ({mode}) -> {args.output}")
    return 0


def add_parsers(commands) -> None:
    c = commands.add_parser(
        "chat", help="chat with a checkpoint in the terminal (streamed, with history)",
        description=f"Interactive chat using the checkpoint's chat template; answers stream token by token. {HELP}.",
    )
    c.add_argument("checkpoint", help="run directory, transformers directory, int8 export, or tiny:<preset>")
    c.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    c.add_argument("--system", help="a system message to start every conversation with")
    c.set_defaults(func=cmd_chat)

    g = commands.add_parser(
        "generate", help="generate completions for a JSONL file of prompts",
        description="Batch generation: one output line per prompt, the input row plus its completion.",
    )
    g.add_argument("checkpoint", help="run directory, transformers directory, int8 export, or tiny:<preset>")
    g.add_argument("--prompts", required=True, help="JSONL file; each row has a prompt (string or chat messages)")
    g.add_argument("--output", required=True, help="JSONL file to write")
    g.add_argument("--prompt-field", default="prompt", help="field holding the prompt (default: prompt)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--batch-size", type=int, default=16, help="default 16")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (batch b uses seed + b)")
    g.set_defaults(func=cmd_generate)
