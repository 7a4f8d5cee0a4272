"""`align data prepare` and `align data mix`: clean a raw text corpus, and mix replay data into new data.

    align data prepare data/tiny_arith/raw_corpus.jsonl --output data/prepared
    align data mix new.jsonl old.jsonl --replay 0.2 --output mixed.jsonl --seed 0

`prepare` reads the input one line at a time (the file is never held in memory;
only 16-byte hashes of kept texts and their MinHash signatures are), and for
every row, in this order:

1. parse it: a line that is not a JSON object with a string `--text-field` is *malformed*;
2. normalise it: Unicode NFKC, control characters removed (tab and newline kept),
   runs of spaces/tabs collapsed to one space, each line and the whole text stripped;
3. filter it: *empty*, *too_short* (< --min-chars), *too_long* (> --max-chars),
   *low_alnum_share* (letters+digits < --min-alnum-share of the non-space characters),
   *repeated_chars* (one character --max-char-run times or more in a row);
4. deduplicate it: *exact_duplicate* (same sha256 of the normalised text as an
   earlier kept row), *near_duplicate* (MinHash LSH over character 5-grams finds an
   earlier kept row whose estimated Jaccard similarity is >= --near-dup-threshold);
5. split it by a hash of the normalised text (the same text always lands in the
   same split, whatever else the file holds).

The first filter a row fails is the one that removes it.  Outputs (in --output):
train.jsonl, validation.jsonl, test.jsonl (each kept row, every field kept, the
text field replaced by its normalised text), removed.jsonl (each removed row:
line, filter, text, and for duplicates the line it duplicates), stats.json and
stats.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
import unicodedata
from collections import Counter
from pathlib import Path

from alignment.errors import DataError

SPLITS = ("train", "validation", "test")
FILTERS = (
    "malformed",
    "empty",
    "too_short",
    "too_long",
    "low_alnum_share",
    "repeated_chars",
    "exact_duplicate",
    "near_duplicate",
)
FILTER_HELP = {
    "malformed": "not a JSON object with a string text field",
    "empty": "nothing left after normalisation",
    "too_short": "fewer characters than --min-chars",
    "too_long": "more characters than --max-chars",
    "low_alnum_share": "letters and digits are less than --min-alnum-share of the non-space characters",
    "repeated_chars": "one character repeated --max-char-run times or more in a row",
    "exact_duplicate": "same normalised text as an earlier kept row",
    "near_duplicate": "MinHash Jaccard similarity >= --near-dup-threshold with an earlier kept row",
}
SHINGLE = 5  # character n-gram size for near-duplicate detection
EXAMPLES_PER_FILTER = 3
EXAMPLE_CHARS = 160
_SPACES = re.compile(r"[ \t\u00a0]+")


# ----------------------------------------------------------------------------- normalisation


def is_control(char: str) -> bool:
    """Control (Cc) and invisible format (Cf: zero-width space, BOM, ...) characters, except tab and newline."""
    return char not in "\t\n" and unicodedata.category(char) in ("Cc", "Cf")


def normalize_text(text: str) -> tuple[str, int, bool]:
    """Return (normalised text, control characters removed, whether NFKC changed anything)."""
    nfkc = unicodedata.normalize("NFKC", text.replace("\r\n", "\n"))
    nfkc_changed = nfkc != text.replace("\r\n", "\n")
    kept = [c for c in nfkc if not is_control(c)]
    removed = len(nfkc) - len(kept)
    lines = [_SPACES.sub(" ", line).strip() for line in "".join(kept).split("\n")]
    return "\n".join(lines).strip(), removed, nfkc_changed


def alnum_share(text: str) -> float:
    """Share of letters and digits among the non-whitespace characters (1.0 for an all-space text)."""
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalnum() for c in visible) / len(visible) if visible else 1.0


def longest_run(text: str) -> int:
    """Length of the longest run of one repeated character."""
    best = run = 0
    previous = None
    for char in text:
        run = run + 1 if char == previous else 1
        previous = char
        best = max(best, run)
    return best


def shingles(text: str, size: int = SHINGLE) -> set[str]:
    """Character n-grams of the lower-cased text (the whole text if it is shorter than n)."""
    text = text.lower()
    if len(text) <= size:
        return {text}
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def split_of(text: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split from the text's hash: a point in [0, 1) compared with the cumulative fractions."""
    point = int.from_bytes(hashlib.sha256(b"split:" + text.encode("utf-8")).digest()[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if point < cumulative:
            return name
    return SPLITS[-1]


def parse_split(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in value.split(","))
    except ValueError:
        raise DataError(f"--split must be three numbers like 0.9,0.05,0.05, got {value!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or not math.isclose(sum(parts), 1.0, abs_tol=1e-6):
        raise DataError(f"--split must be three non-negative fractions summing to 1 (train,validation,test), got {value!r}")
    return parts  # type: ignore[return-value]


# ----------------------------------------------------------------------------- statistics


class LengthHistogram:
    """Streaming length statistics: count, min, max, mean and power-of-two buckets."""

    def __init__(self):
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None
        self.buckets: Counter = Counter()

    def add(self, length: int) -> None:
        self.count += 1
        self.total += length
        self.min = length if self.min is None else min(self.min, length)
        self.max = length if self.max is None else max(self.max, length)
        self.buckets[0 if length == 0 else 1 << (length.bit_length() - 1)] += 1

    def as_dict(self) -> dict:
        return {
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "mean": round(self.total / self.count, 1) if self.count else None,
            "buckets": {
                (f"{low}-{2 * low - 1}" if low else "0"): n for low, n in sorted(self.buckets.items())
            },
        }


def _example(line: int, text, extra: dict | None = None) -> dict:
    shown = text if isinstance(text, str) else json.dumps(text)
    if len(shown) > EXAMPLE_CHARS:
        shown = shown[:EXAMPLE_CHARS] + f"... ({len(shown)} chars)"
    return {"line": line, "text": shown, **(extra or {})}


# ----------------------------------------------------------------------------- near duplicates


class NearDuplicateIndex:
    """MinHash LSH over character shingles; `find` returns the line of an earlier near-duplicate or None."""

    def __init__(self, threshold: float, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self._template = MinHash(num_perm=num_perm, seed=seed)
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[int, object] = {}

    def signature(self, text: str):
        from datasketch import MinHash

        extra = {"scheme": self._template.scheme} if hasattr(self._template, "scheme") else {}  # datasketch >= 2
        sig = MinHash(num_perm=len(self._template.hashvalues), seed=self._template.seed,
                      permutations=self._template.permutations, **extra)
        sig.update_batch([s.encode("utf-8") for s in sorted(shingles(text))])
        return sig

    def find(self, signature) -> tuple[int, float] | None:
        """The most similar earlier row whose estimated Jaccard passes the threshold (line, similarity)."""
        best = None
        for key in self._lsh.query(signature):
            similarity = signature.jaccard(self._signatures[key])
            if similarity >= self.threshold and (best is None or (similarity, -key) > (best[1], -best[0])):
                best = (key, similarity)
        return best

    def add(self, line: int, signature) -> None:
        self._lsh.insert(line, signature)
        self._signatures[line] = signature


# ----------------------------------------------------------------------------- prepare


def prepare(
    input_path: str | Path,
    output_dir: str | Path,
    *,
    text_field: str = "text",
    min_chars: int = 16,
    max_chars: int = 10_000,
    min_alnum_share: float = 0.6,
    max_char_run: int = 10,
    near_dup_threshold: float | None = 0.8,
    split: tuple[float, float, float] = (0.9, 0.05, 0.05),
) -> dict:
    """Clean, deduplicate and split a JSONL corpus (see the module docstring); returns the stats dict."""
    input_path, output_dir = Path(input_path), Path(output_dir)
    if not input_path.is_file():
        raise DataError(f"{input_path}: no such input file")
    if min_chars < 0 or max_chars < min_chars:
        raise DataError(f"need 0 <= --min-chars <= --max-chars, got {min_chars} and {max_chars}")
    if near_dup_threshold is not None and not 0 < near_dup_threshold <= 1:
        raise DataError(f"--near-dup-threshold must be in (0, 1], got {near_dup_threshold}")
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    removed_counts = Counter({name: 0 for name in FILTERS})
    examples: dict[str, list] = {name: [] for name in FILTERS}
    cleaned = Counter({"control_chars_rows": 0, "control_chars_removed": 0, "nfkc_changed_rows": 0})
    cleaned_examples: list = []
    split_counts = Counter({name: 0 for name in SPLITS})
    lengths_in, lengths_out = LengthHistogram(), LengthHistogram()
    seen: set[bytes] = set()
    first_line_of: dict[bytes, int] = {}
    index = NearDuplicateIndex(near_dup_threshold) if near_dup_threshold is not None else None
    rows_in = 0

    tmp = {name: output_dir / f".{name}.jsonl.tmp-{os.getpid()}" for name in (*SPLITS, "removed")}
    handles = {name: path.open("w", encoding="utf-8") for name, path in tmp.items()}

    def remove(reason: str, line: int, text, extra: dict | None = None) -> None:
        removed_counts[reason] += 1
        if len(examples[reason]) < EXAMPLES_PER_FILTER:
            examples[reason].append(_example(line, text, extra))
        record = {"line": line, "filter": reason, "text": text if isinstance(text, str) else json.dumps(text)}
        handles["removed"].write(json.dumps({**record, **(extra or {})}, ensure_ascii=False) + "\n")

    try:
        with input_path.open("rb") as source:
            for line_number, raw in enumerate(source, start=1):
                rows_in += 1
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError:
                    remove("malformed", line_number, raw[:EXAMPLE_CHARS].decode("utf-8", "replace"),
                           {"why": "not UTF-8"})
                    continue
                if not decoded.strip():
                    remove("empty", line_number, "", {"why": "blank line"})
                    continue
                try:
                    row = json.loads(decoded)
                except json.JSONDecodeError as exc:
                    remove("malformed", line_number, decoded.rstrip("\n"), {"why": f"bad JSON: {exc.msg}"})
                    continue
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    why = (f"not a JSON object ({type(row).__name__})" if not isinstance(row, dict)
                           else f"field {text_field!r} missing or not a string")
                    remove("malformed", line_number, decoded.rstrip("\n"), {"why": why})
                    continue

                text, controls, nfkc_changed = normalize_text(row[text_field])
                if controls:
                    cleaned["control_chars_rows"] += 1
                    cleaned["control_chars_removed"] += controls
                    if len(cleaned_examples) < EXAMPLES_PER_FILTER:
                        cleaned_examples.append(_example(line_number, row[text_field].encode("unicode_escape").decode(),
                                                         {"removed": controls}))
                cleaned["nfkc_changed_rows"] += int(nfkc_changed)
                lengths_in.add(len(text))

                if not text:
                    remove("empty", line_number, row[text_field])
                    continue
                if len(text) < min_chars:
                    remove("too_short", line_number, text, {"chars": len(text)})
                    continue
                if len(text) > max_chars:
                    remove("too_long", line_number, text, {"chars": len(text)})
                    continue
                share = alnum_share(text)
                if share < min_alnum_share:
                    remove("low_alnum_share", line_number, text, {"alnum_share": round(share, 3)})
                    continue
                run = longest_run(text)
                if run >= max_char_run:
                    remove("repeated_chars", line_number, text, {"run": run})
                    continue
                digest = text_hash(text)
                if digest in seen:
                    remove("exact_duplicate", line_number, text, {"duplicate_of": first_line_of[digest]})
                    continue
                if index is not None:
                    signature = index.signature(text)
                    match = index.find(signature)
                    if match is not None:
                        remove("near_duplicate", line_number, text,
                               {"duplicate_of": match[0], "similarity": round(match[1], 3)})
                        continue
                    index.add(line_number, signature)
                seen.add(digest)
                first_line_of[digest] = line_number

                name = split_of(text, split)
                split_counts[name] += 1
                lengths_out.add(len(text))
                handles[name].write(json.dumps({**row, text_field: text}, ensure_ascii=False) + "\n")
    finally:
        for handle in handles.values():
            handle.close()
    for name, path in tmp.items():
        os.replace(path, output_dir / f"{name}.jsonl")

    kept = sum(split_counts.values())
    stats = {
        "input": str(input_path),
        "input_sha256": _file_sha256(input_path),
        "output_dir": str(output_dir),
        "settings": {
            "text_field": text_field,
            "min_chars": min_chars,
            "max_chars": max_chars,
            "min_alnum_share": min_alnum_share,
            "max_char_run": max_char_run,
            "near_dup_threshold": near_dup_threshold,
            "near_dup_shingle_chars": SHINGLE,
            "split": dict(zip(SPLITS, split)),
        },
        "rows_in": rows_in,
        "rows_out": kept,
        "rows_removed": rows_in - kept,
        "removed": dict(removed_counts),
        "removed_examples": examples,
        "cleaned": dict(cleaned),
        "cleaned_examples": cleaned_examples,
        "splits": dict(split_counts),
        "length_chars_after_normalisation": lengths_in.as_dict(),
        "length_chars_kept": lengths_out.as_dict(),
        "seconds": round(time.time() - started, 2),
    }
    from alignment.checkpoint import write_atomic, write_json

    write_json(output_dir / "stats.json", stats)
    write_atomic(output_dir / "stats.md", stats_markdown(stats))
    return stats


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def stats_markdown(stats: dict) -> str:
    lines = [
        f"# Data preparation: {stats['input']}",
        "",
        f"{stats['rows_in']} rows in, **{stats['rows_out']} kept**, {stats['rows_removed']} removed "
        f"({stats['seconds']} s).",
        "",
        "| split | rows |",
        "| --- | ---: |",
        *[f"| {name} | {n} |" for name, n in stats["splits"].items()],
        "",
        "## What each filter removed",
        "",
        "Filters run in this order; a row is counted under the first one it fails.",
        "",
        "| filter | removed | rule |",
        "| --- | ---: | --- |",
        *[f"| {name} | {n} | {FILTER_HELP[name]} |" for name, n in stats["removed"].items()],
        "",
        "## Cleaning (rows kept, text changed)",
        "",
        f"- control characters removed: {stats['cleaned']['control_chars_removed']} "
        f"in {stats['cleaned']['control_chars_rows']} rows",
        f"- rows changed by NFKC normalisation: {stats['cleaned']['nfkc_changed_rows']}",
        "",
    ]
    for title, key in (("after normalisation (all parsed rows)", "length_chars_after_normalisation"),
                       ("of kept rows", "length_chars_kept")):
        dist = stats[key]
        lines += [f"## Length in characters, {title}", "",
                  f"count {dist['count']}, min {dist['min']}, mean {dist['mean']}, max {dist['max']}", "",
                  "| chars | rows |", "| --- | ---: |",
                  *[f"| {bucket} | {n} |" for bucket, n in dist["buckets"].items()], ""]
    lines += ["## Examples", ""]
    for name, found in stats["removed_examples"].items():
        if not found:
            continue
        lines += [f"**{name}**", ""]
        for example in found:
            extra = ", ".join(f"{k} {v}" for k, v in example.items() if k not in ("line", "text"))
            lines.append(f"- line {example['line']}{' (' + extra + ')' if extra else ''}: `{_md_cell(example['text'])}`")
        lines.append("")
    if stats["cleaned_examples"]:
        lines += ["**control characters removed** (shown escaped, before cleaning)", ""]
        for example in stats["cleaned_examples"]:
            lines.append(f"- line {example['line']} ({example['removed']} removed): `{_md_cell(example['text'])}`")
        lines.append("")
    lines += ["Every removed row is listed in `removed.jsonl` (line, filter, text, duplicate_of).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- mix


def count_rows(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def _rows(path: Path):
    """(line number, raw line without newline) of each non-blank line, streamed."""
    with path.open("r", encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw.rstrip("\n")


def _columns(raw: str, where: str) -> list[str]:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON: {exc.msg}") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    return sorted(row)


def mix(new_path: str | Path, old_path: str | Path, output: str | Path, *, replay: float, seed: int = 0) -> dict:
    """All rows of NEW plus replayed rows of OLD, so that OLD makes up `replay` of the output.

    With n rows in NEW, k = round(replay * n / (1 - replay)) rows of OLD are drawn
    without replacement (reservoir sampling, seeded) and inserted at seeded random
    positions among the NEW rows, which keep their order.  Both files are streamed;
    only the k replayed rows are held in memory.  A sidecar ``OUTPUT.mix.json``
    records the inputs (with hashes), counts, seed and the replayed line numbers.
    """
    new_path, old_path, output = Path(new_path), Path(old_path), Path(output)
    for path in (new_path, old_path):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    if not 0 <= replay < 1:
        raise DataError(f"--replay is the share of old rows in the mix and must be in [0, 1), got {replay}")
    n_new, n_old = count_rows(new_path), count_rows(old_path)
    if n_new == 0:
        raise DataError(f"{new_path}: no rows")
    k = round(replay * n_new / (1 - replay))
    if k > n_old:
        raise DataError(
            f"--replay {replay} over {n_new} new rows needs {k} old rows but {old_path} has {n_old}; "
            "lower --replay or give a larger replay file"
        )
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, (number, raw) in enumerate(_rows(old_path)):
        if i < k:
            reservoir.append((number, raw))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (number, raw)
    rng.shuffle(reservoir)
    positions = set(rng.sample(range(n_new + k), k))

    new_rows = _rows(new_path)
    first_new = next(_rows(new_path))
    new_columns = _columns(first_new[1], f"{new_path}:{first_new[0]}")
    old_columns = _columns(reservoir[0][1], f"{old_path}:{reservoir[0][0]}") if reservoir else new_columns
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    replayed = iter(reservoir)
    with tmp.open("w", encoding="utf-8") as handle:
        for slot in range(n_new + k):
            source = replayed if slot in positions else new_rows
            handle.write(next(source)[1] + "\n")
    os.replace(tmp, output)

    record = {
        "output": str(output),
        "output_sha256": _file_sha256(output),
        "new": {"path": str(new_path), "sha256": _file_sha256(new_path), "rows": n_new},
        "old": {"path": str(old_path), "sha256": _file_sha256(old_path), "rows": n_old},
        "replay": replay,
        "replay_rows": k,
        "total_rows": n_new + k,
        "actual_replay_share": round(k / (n_new + k), 6),
        "seed": seed,
        "columns_match": new_columns == old_columns,
        "new_columns": new_columns,
        "old_columns": old_columns,
        "replayed_old_lines": sorted(number for number, _ in reservoir),
    }
    from alignment.checkpoint import write_json

    write_json(sidecar_path(output), record)
    return record


def sidecar_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".mix.json")


# ----------------------------------------------------------------------------- CLI


def cmd_prepare(args) -> int:
    stats = prepare(
        args.input, args.output, text_field=args.text_field, min_chars=args.min_chars, max_chars=args.max_chars,
        min_alnum_share=args.min_alnum_share, max_char_run=args.max_char_run,
        near_dup_threshold=None if args.near_dup_threshold <= 0 else args.near_dup_threshold,
        split=parse_split(args.split),
    )
    removed = ", ".join(f"{name} {n}" for name, n in stats["removed"].items() if n) or "nothing"
    print(f"{stats['rows_in']} rows in, {stats['rows_out']} kept "
          f"({', '.join(f'{k} {v}' for k, v in stats['splits'].items())}); removed: {removed}; "
          f"control characters removed from {stats['cleaned']['control_chars_rows']} rows")
    print(f"report: {Path(args.output) / 'stats.md'}")
    return 0


def cmd_mix(args) -> int:
    record = mix(args.new, args.old, args.output, replay=args.replay, seed=args.seed)
    print(f"{record['total_rows']} rows -> {record['output']} ({record['new']['rows']} new + "
          f"{record['replay_rows']} replayed from {record['old']['path']}, share {record['actual_replay_share']:.3f})")
    if not record["columns_match"]:
        print(f"warning: the files have different columns: new {record['new_columns']}, old {record['old_columns']}")
    print(f"mix recorded in {sidecar_path(Path(args.output))}")
    return 0


def add_parsers(data_commands) -> None:
    p = data_commands.add_parser(
        "prepare", help="clean, filter, deduplicate and split a JSONL text corpus",
        description="Stream a JSONL corpus: NFKC + control-character cleaning, length and quality filters, "
        "exact and MinHash near-duplicate removal, hash-based train/validation/test split; "
        "writes the splits, removed.jsonl, stats.json and stats.md.",
    )
    p.add_argument("input", help="JSONL file, one object per line")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    p.add_argument("--min-chars", type=int, default=16, help="drop texts shorter than this (default 16)")
    p.add_argument("--max-chars", type=int, default=10_000, help="drop texts longer than this (default 10000)")
    p.add_argument("--min-alnum-share", type=float, default=0.6,
                   help="drop texts whose letters+digits are below this share of non-space characters (default 0.6)")
    p.add_argument("--max-char-run", type=int, default=10,
                   help="drop texts with one character repeated this many times in a row (default 10)")
    p.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="MinHash Jaccard similarity at which a text is a near-duplicate (default 0.8; 0 turns it off)")
    p.add_argument("--split", default="0.9,0.05,0.05", help="train,validation,test fractions (default 0.9,0.05,0.05)")
    p.set_defaults(func=cmd_prepare)

    m = data_commands.add_parser(
        "mix", help="mix replay rows from an earlier dataset into a new one (deterministic)",
        description="Write all rows of NEW plus enough rows of OLD that OLD makes up --replay of the output; "
        "seeded, streamed, recorded in OUTPUT.mix.json.",
    )
    m.add_argument("new", help="JSONL of the new task")
    m.add_argument("old", help="JSONL of earlier data to replay")
    m.add_argument("--replay", type=float, required=True, help="share of the output drawn from OLD, in [0, 1)")
    m.add_argument("--output", required=True, help="mixed JSONL file")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_mix)
