"""Tools around the training stages: data preparation, tokenizers, replay mixes, export, chat, generation.

    align data prepare CORPUS.jsonl --output DIR     clean, filter, deduplicate, split (prepare.py)
    align data tokenizer CORPUS --output DIR         train a BPE / Unigram tokenizer (tokenizer.py)
    align data mix NEW.jsonl OLD.jsonl --replay 0.2 --output MIXED.jsonl   replay mix (prepare.py)
    align export CKPT --output DIR --int8 --prune 0.3                      export + report (export.py)
    align chat CKPT                                  interactive, streamed (chat.py)
    align generate CKPT --prompts P.jsonl --output OUT.jsonl               batch (chat.py)

See docs/tools.md.  Importing this package (and building the parsers) loads no
heavy library: torch, transformers and datasketch are imported by the commands.
"""

from __future__ import annotations


def add_command(commands) -> None:
    """Add `data` (prepare, tokenizer, mix), `export`, `chat` and `generate` to the `align` CLI."""
    from alignment.tools import chat, export, prepare, tokenizer

    data = commands.add_parser("data", help="prepare a corpus, train a tokenizer, mix in replay data",
                               description="Data tools: prepare (clean/filter/dedup/split), tokenizer, mix.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prepare.add_parsers(data_commands)
    tokenizer.add_parsers(data_commands)
    export.add_parser(commands)
    chat.add_parsers(commands)
