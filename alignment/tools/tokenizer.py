"""`align data tokenizer`: train a tokenizer on a corpus and save it as a standard transformers tokenizer.

    align data tokenizer data/tiny_arith/pretrain.jsonl --output runs/tokenizer --kind bpe --vocab-size 512

Two kinds, both from the `tokenizers` library:

* ``bpe`` - byte-level BPE (GPT-2 style): every string round-trips exactly, no unknown token is ever produced.
* ``unigram`` - SentencePiece-style Unigram over Metaspace pre-tokens; characters never seen in
  training become the unknown token.  It needs a varied corpus: on a corpus of a few
  dozen distinct words (the templated demo text) it stays close to one token per character.

Both get four distinct special tokens (pad, unk, bos, eos: the ones of
:mod:`policies.tiny`), digits split one per token unless ``--no-split-digits``,
and a chat template (:data:`policies.tiny.CHAT_TEMPLATE` unless ``--chat-template FILE``).
The output folder loads with ``AutoTokenizer.from_pretrained(DIR)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from alignment.errors import DataError

KINDS = ("bpe", "unigram")


def iter_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Texts of a corpus, streamed: a .jsonl file (the text field of each row) or a plain text file (each line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such corpus file")
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                yield line.rstrip("\n")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON: {exc.msg}") from None
            value = row.get(text_field) if isinstance(row, dict) else None
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):  # conversational rows: the content of every message
                yield from (m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
            else:
                raise DataError(f"{path}:{number}: field {text_field!r} missing or not a string/messages")


def build_backend(kind: str, split_digits: bool):
    """An untrained `tokenizers.Tokenizer` and its trainer class for `kind`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from policies.tiny import UNK

    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(digits + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        # Metaspace first: splitting digits before it would give every digit a word-start marker.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="first")] + digits)
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    else:
        raise DataError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return tokenizer


def train(
    corpus: str | Path,
    *,
    kind: str = "bpe",
    vocab_size: int = 512,
    text_field: str = "text",
    split_digits: bool = True,
    chat_template: str | None = None,
    model_max_length: int = 2048,
):
    """Train on `corpus`; return (`transformers.PreTrainedTokenizerFast` with special tokens and template, texts seen)."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from policies.tiny import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, UNK

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"--vocab-size must be larger than the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    backend = build_backend(kind, split_digits)
    if kind == "bpe":
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK,
                                          show_progress=False)
    count = 0

    def counted():
        nonlocal count
        for text in iter_texts(corpus, text_field):
            count += 1
            yield text

    backend.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise DataError(f"{corpus}: no texts to train a tokenizer on")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                        eos_token=EOS)
    tokenizer.chat_template = chat_template or CHAT_TEMPLATE
    tokenizer.model_max_length = model_max_length
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if len(set(ids)) != len(ids) or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise DataError(f"special tokens {SPECIAL_TOKENS} did not get distinct ids: {ids}")
    return tokenizer, count


def corpus_stats(tokenizer, corpus: str | Path, text_field: str, limit: int = 2000) -> dict:
    """Characters per token, unknown-token rate and round-trip failures over the first `limit` texts."""
    chars = tokens = unknown = mismatches = texts = 0
    for text in iter_texts(corpus, text_field):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        chars += len(text)
        tokens += len(ids)
        unknown += sum(1 for i in ids if i == tokenizer.unk_token_id)
        mismatches += int(tokenizer.decode(ids) != text)
        texts += 1
        if texts >= limit:
            break
    return {
        "texts_checked": texts,
        "chars_per_token": round(chars / tokens, 3) if tokens else None,
        "unknown_token_rate": round(unknown / tokens, 5) if tokens else None,
        "round_trip_failures": mismatches,
    }


def cmd_tokenizer(args) -> int:
    from alignment.checkpoint import write_json

    template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    tokenizer, texts = train(args.corpus, kind=args.kind, vocab_size=args.vocab_size, text_field=args.text_field,
                      split_digits=args.split_digits, chat_template=template, model_max_length=args.model_max_length)
    output = Path(args.output)
    tokenizer.save_pretrained(str(output))
    report = {
        "corpus": str(args.corpus),
        "kind": args.kind,
        "vocab_size_requested": args.vocab_size,
        "vocab_size": len(tokenizer),
        "training_texts": texts,
        "split_digits": args.split_digits,
        "special_tokens": {name: {"token": getattr(tokenizer, f"{name}_token"), "id": getattr(tokenizer, f"{name}_token_id")}
                           for name in ("pad", "unk", "bos", "eos")},
        "chat_template": args.chat_template or "policies.tiny.CHAT_TEMPLATE",
        **corpus_stats(tokenizer, args.corpus, args.text_field),
    }
    write_json(output / "tokenizer_report.json", report)
    print(f"{args.kind} tokenizer, {report['vocab_size']} tokens, trained on {texts} texts -> {output} "
          f"({report['chars_per_token']} chars/token, {report['round_trip_failures']} round-trip failures "
          f"in {report['texts_checked']} texts)")
    return 0


def add_parsers(data_commands) -> None:
    p = data_commands.add_parser(
        "tokenizer", help="train a BPE or Unigram tokenizer and save it for AutoTokenizer",
        description="Train a tokenizer on a corpus (.jsonl text field, or a plain text file, one text a line) "
        "with distinct pad/unk/bos/eos tokens and a chat template; save it as a transformers tokenizer.",
    )
    p.add_argument("corpus", help="corpus file: .jsonl (see --text-field) or plain text")
    p.add_argument("--output", required=True, help="output folder (AutoTokenizer.from_pretrained loads it)")
    p.add_argument("--kind", choices=KINDS, default="bpe", help="byte-level BPE (default) or Unigram")
    p.add_argument("--vocab-size", type=int, default=512, help="target vocabulary size, special tokens included")
    p.add_argument("--text-field", default="text", help="field of each JSONL row holding the text (default: text)")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false",
                   help="let merges join digits (by default every digit is its own token)")
    p.add_argument("--chat-template", help="a Jinja chat template file (default: the tiny demo's ChatML-style one)")
    p.add_argument("--model-max-length", type=int, default=2048, help="tokenizer's model_max_length (default 2048)")
    p.set_defaults(func=cmd_tokenizer)
