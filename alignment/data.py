"""Datasets for every stage, in trl's formats, validated before any model is loaded.

Formats (standard = strings, conversational = lists of {"role", "content"}):

| format      | stages                          | columns                                     |
| ----------- | ------------------------------- | ------------------------------------------- |
| text        | pretrain                        | text                                        |
| sft         | sft                             | messages, or prompt + completion, or text   |
| preference  | reward_model, dpo, orpo, ...    | chosen, rejected (+ prompt, or implicit)    |
| prompt      | ppo, grpo, rloo, best_of_n      | prompt (+ any columns the rewards read)     |
| unpaired    | kto                             | prompt, completion, label (bool)            |

Sources: a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, or a
dataset name on the hub (``name`` or ``name:config``, read from the stage's split:
``data.split`` for training, ``test`` for ``data.eval``; ``name@split`` names the
split, e.g. ``trl-lib/ultrafeedback-prompt@test``).  Errors name the file,
the line or row, and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from alignment.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class LoadReport:
    """What loading kept and dropped, written into the run directory."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


# ----------------------------------------------------------------------------- reading


def _where(origin: str, index: int, line: int | None) -> str:
    return f"{origin}:{line}: row {index}" if line else f"{origin}: row {index}"


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a JSONL file and their line numbers; a bad line is an error naming it."""
    rows, lines = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
            lines.append(number)
    return rows, lines


def read_rows(source: str, split: str = "train") -> tuple[list[dict], list[int] | None]:
    """Read a local file or a hub dataset into a list of dict rows (+ line numbers for JSONL)."""
    if not isinstance(source, str) or not source:
        raise DataError(f"data source must be a file path or a dataset name, got {source!r}")
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{source}: no such data file (paths are relative to {Path.cwd()})")
        try:
            if path.suffix == ".jsonl":
                return read_jsonl(path)
            return _read_with_datasets(path), None
        except OSError as exc:
            raise DataError(f"{source}: cannot read the data file: {exc.strerror or exc}") from None
    return _read_hub(source, split), None


def first_row(source: str, split: str = "train") -> dict | None:
    """The first row of a dataset (a JSONL file is read only up to it); None when empty or unreadable."""
    path = Path(source)
    try:
        if path.suffix == ".jsonl" and path.is_file():
            with path.open("rb") as handle:
                for raw in handle:
                    if raw.strip():
                        row = json.loads(raw.decode("utf-8-sig"))
                        return row if isinstance(row, dict) else None
            return None
        rows, _ = read_rows(source, split)
        return rows[0] if rows else None
    except (DataError, OSError, ValueError, RecursionError):
        return None


def is_conversational_row(row: dict | None) -> bool:
    """True when a row holds a list of {"role", "content"} messages in any column."""
    if not isinstance(row, dict):
        return False
    return any(isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]
               for value in row.values())


def _read_with_datasets(path: Path) -> list[dict]:
    import datasets

    builder = {".json": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types; name the file
        raise DataError(f"{path}: could not read as {builder}: {exc}") from None
    return dataset.to_list()


def _read_hub(name: str, split: str) -> list[dict]:
    """``name``, ``name:config``, either with ``@split`` to read that split instead of ``split``."""
    import datasets

    source, _, named_split = name.partition("@")
    repo, _, config = source.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config or None, split=named_split or split)
    except Exception as exc:
        raise DataError(
            f"{name}: not a local file ({', '.join(LOCAL_SUFFIXES)}) and could not be loaded from the hub: {exc}"
        ) from None
    return dataset.to_list()


# ----------------------------------------------------------------------------- validation


def _check_messages(value, where: str, name: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field {name!r} message {i} needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: field {name!r} message {i} has role {message['role']!r}; "
                            f"expected one of {ROLES}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: field {name!r} message {i} content must be a string")


def _check_text_or_messages(row: dict, name: str, where: str, required: bool = True) -> str | None:
    """'standard' for a string, 'conversational' for messages; error naming the field otherwise."""
    if name not in row or row[name] is None:
        if required:
            raise DataError(f"{where}: missing field {name!r} (columns present: {_columns(row)})")
        return None
    value = row[name]
    if isinstance(value, str):
        return "standard"
    _check_messages(value, where, name)
    return "conversational"


def _same_kind(where: str, **kinds) -> None:
    """The text fields of one row are all strings or all message lists (trl cannot mix them)."""
    present = {name: kind for name, kind in kinds.items() if kind is not None}
    if len(set(present.values())) > 1:
        described = ", ".join(f"{name!r} is {'a string' if kind == 'standard' else 'a message list'}"
                              for name, kind in present.items())
        raise DataError(f"{where}: {described}; use strings for all of them or message lists for all of them")


def _text_of(value) -> str:
    if isinstance(value, str):
        return value
    return "".join(m["content"] for m in value)


def _columns(row: dict) -> list[str]:
    return sorted(map(str, row))


def validate_row(row: dict, fmt: str, where: str, report: LoadReport) -> bool:
    """Check one row in place; return False when the row is dropped (and counted)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a mapping of columns, got {type(row).__name__}")
    if fmt == "text":
        if not isinstance(row.get("text"), str):
            raise DataError(f"{where}: field 'text' must be a string (columns present: {_columns(row)})")
        if not row["text"].strip():
            report.drop("empty text")
            return False
    elif fmt == "sft":
        if "messages" in row:
            _check_messages(row["messages"], where, "messages")
            if not any(m["role"] == "assistant" for m in row["messages"]):
                raise DataError(f"{where}: field 'messages' has no assistant message to train on")
        elif "prompt" in row or "completion" in row:
            _same_kind(where, prompt=_check_text_or_messages(row, "prompt", where),
                       completion=_check_text_or_messages(row, "completion", where))
            if not _text_of(row["completion"]).strip():
                report.drop("empty completion")
                return False
        elif "text" in row:
            return validate_row(row, "text", where, report)
        else:
            raise DataError(f"{where}: an SFT row needs 'messages', 'prompt'+'completion' or 'text'; got {_columns(row)}")
    elif fmt == "preference":
        _same_kind(where, prompt=_check_text_or_messages(row, "prompt", where, required=False),
                   chosen=_check_text_or_messages(row, "chosen", where),
                   rejected=_check_text_or_messages(row, "rejected", where))
        chosen, rejected = _text_of(row["chosen"]), _text_of(row["rejected"])
        if not chosen.strip() or not rejected.strip():
            report.drop("empty chosen or rejected")
            return False
        if chosen == rejected:
            report.drop("chosen == rejected")
            return False
    elif fmt == "prompt":
        _check_text_or_messages(row, "prompt", where)
        if not _text_of(row["prompt"]).strip():
            report.drop("empty prompt")
            return False
    elif fmt == "unpaired":
        _same_kind(where, prompt=_check_text_or_messages(row, "prompt", where),
                   completion=_check_text_or_messages(row, "completion", where))
        if not isinstance(row.get("label"), bool):
            raise DataError(f"{where}: field 'label' must be true or false")
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    return True


def _check_consistent_types(rows: list[dict], positions, origin: str) -> None:
    """Arrow needs one type per column: name the first row whose column type differs.

    `positions` holds (row index in the file, line number or None) of each row.
    """
    first: dict[str, tuple[type, int]] = {}
    for position, row in enumerate(rows):
        index, line = positions[position] if positions else (position, None)
        for name, value in row.items():
            kind = type(value)
            if value is None:
                continue
            if name not in first:
                first[name] = (kind, index)
            elif (kind is int and first[name][0] is float) or (kind is float and first[name][0] is int):
                continue
            elif first[name][0] is not kind:
                where = _where(origin, index, line)
                raise DataError(
                    f"{where}: field {name!r} is {kind.__name__} but row {first[name][1]} has "
                    f"{first[name][0].__name__}; a column must have one type"
                )


def validate_rows(rows: list[dict], lines, fmt: str, origin: str, max_dropped_fraction: float = 0.05):
    """Validate every row; return (kept rows, report).  Fails when empty or when too many are dropped."""
    report = LoadReport(source=origin, rows_read=len(rows))
    kept, kept_at = [], []
    for index, row in enumerate(rows):
        where = _where(origin, index, lines[index] if lines else None)
        if validate_row(row, fmt, where, report):
            kept.append(row)
            kept_at.append((index, lines[index] if lines else None))
    report.rows_kept = len(kept)
    if not kept:
        raise DataError(f"{origin}: no usable rows ({report.rows_read} read, dropped: {report.dropped or 'none'})")
    dropped = report.rows_read - report.rows_kept
    if report.rows_read and dropped / report.rows_read > max_dropped_fraction:
        raise DataError(
            f"{origin}: {dropped} of {report.rows_read} rows dropped ({report.dropped}), more than "
            f"data.max_dropped_fraction={max_dropped_fraction}; fix the data or raise the limit"
        )
    _check_consistent_types(kept, kept_at, origin)
    return kept, report


# ----------------------------------------------------------------------------- entry point


@dataclass
class Splits:
    train: object  # datasets.Dataset
    eval: object | None
    reports: list


def load_rows(source: str, fmt: str, split: str = "train", max_samples=None, max_dropped_fraction: float = 0.05):
    rows, lines = read_rows(source, split)
    if not rows:
        raise DataError(f"{source}: the dataset is empty")
    if max_samples is not None:
        rows, lines = rows[:max_samples], (lines[:max_samples] if lines else None)
    return validate_rows(rows, lines, fmt, source, max_dropped_fraction)


def load(spec, fmt: str, seed: int = 42) -> Splits:
    """Load and validate a recipe's `data:` section into train (and eval) `datasets.Dataset`s.

    The eval split is `spec.eval` when given, else a deterministic `eval_fraction`
    of the training rows (seeded shuffle), else None.
    """

    train_rows, train_report = load_rows(spec.train, fmt, spec.split, spec.max_samples, spec.max_dropped_fraction)
    reports = [train_report]
    eval_rows = None
    if spec.eval:
        eval_rows, eval_report = load_rows(spec.eval, fmt, "test", None, spec.max_dropped_fraction)
        reports.append(eval_report)
    train = _to_dataset(train_rows, spec.train)
    evaluation = _to_dataset(eval_rows, spec.eval) if eval_rows else None
    if evaluation is None and spec.eval_fraction > 0:
        try:
            parts = train.train_test_split(test_size=spec.eval_fraction, seed=seed, shuffle=True)
        except ValueError as exc:
            raise DataError(f"{spec.train}: cannot hold out data.eval_fraction={spec.eval_fraction} of "
                            f"{len(train)} rows: {exc}") from None
        train, evaluation = parts["train"], parts["test"]
    return Splits(train=train, eval=evaluation, reports=reports)


def _to_dataset(rows: list[dict], origin: str):
    """A `datasets.Dataset` of validated rows; a column Arrow cannot store (mixed nested types) names the file."""
    import datasets

    try:
        return datasets.Dataset.from_list(rows)
    except Exception as exc:  # pyarrow raises ArrowInvalid / ArrowTypeError / TypeError / ValueError
        raise DataError(f"{origin}: the rows cannot form a table (a column holds values of different "
                        f"nested types?): {type(exc).__name__}: {exc}") from None


def data_fingerprint(path: str) -> str | None:
    """sha256 of a local data file (for run_info lineage); None for hub datasets."""
    import hashlib

    file = Path(path)
    if not file.is_file():
        return None
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
