"""`align data prepare` on the planted demo corpus: each filter removes exactly what was planted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from alignment.errors import DataError
from alignment.tools import prepare as prep

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data/tiny_arith/raw_corpus.jsonl"


def planted_labels() -> dict[int, str]:
    """line number -> the filter that must remove it, read from the corpus itself."""
    expected = {}
    for number, line in enumerate(CORPUS.read_text(encoding="utf-8").split("\n")[:-1], start=1):
        if not line.strip():
            expected[number] = "empty"
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            expected[number] = "malformed"
            continue
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            expected[number] = "malformed"
        elif row.get("planted") not in (None, "control"):
            expected[number] = row["planted"]
    return expected


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from alignment import cli

    out = tmp_path_factory.mktemp("prepared")
    assert cli.main(["data", "prepare", str(CORPUS), "--output", str(out)]) == 0
    return out, json.loads((out / "stats.json").read_text())


def test_each_filter_removes_exactly_the_planted_rows(prepared):
    out, stats = prepared
    removed = {r["line"]: r["filter"] for r in read_jsonl(out / "removed.jsonl")}
    expected = planted_labels()
    assert removed == expected
    counts = Counter(expected.values())
    assert stats["removed"] == {name: counts.get(name, 0) for name in prep.FILTERS}
    for name in prep.FILTERS:  # every filter is exercised by the demo corpus
        assert stats["removed"][name] > 0, name
    assert stats["rows_in"] == len(CORPUS.read_text(encoding="utf-8").split("\n")[:-1])
    assert stats["rows_out"] == stats["rows_in"] - len(expected) == sum(stats["splits"].values())


def test_control_characters_are_removed_and_their_rows_kept(prepared):
    out, stats = prepared
    kept = [row for split in prep.SPLITS for row in read_jsonl(out / f"{split}.jsonl")]
    control_ids = {json.loads(line)["id"] for line in CORPUS.read_text(encoding="utf-8").splitlines()
                   if line.startswith("{") and '"planted": "control"' in line}
    assert len(control_ids) == stats["cleaned"]["control_chars_rows"] == 8
    assert control_ids <= {row["id"] for row in kept}
    assert stats["cleaned"]["control_chars_removed"] == 16  # two planted in each row
    assert not any(prep.is_control(c) for row in kept for c in row["text"])


def test_duplicates_point_at_the_row_they_copy(prepared):
    out, _ = prepared
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    for record in read_jsonl(out / "removed.jsonl"):
        if record["filter"] not in ("exact_duplicate", "near_duplicate"):
            continue
        original = prep.normalize_text(json.loads(lines[record["duplicate_of"] - 1])["text"])[0]
        copy = prep.normalize_text(json.loads(lines[record["line"] - 1])["text"])[0]
        if record["filter"] == "exact_duplicate":
            assert copy == original  # also the full-width-digit and extra-whitespace variants, after NFKC
        else:
            assert len(copy) == len(original) and sum(a != b for a, b in zip(copy, original)) == 1
            assert record["similarity"] >= 0.8


def test_outputs_keep_fields_and_hold_normalised_text(prepared):
    out, stats = prepared
    rows = read_jsonl(out / "train.jsonl")
    assert rows and all(set(row) >= {"id", "text"} for row in rows)
    assert all(prep.normalize_text(row["text"])[0] == row["text"] for row in rows)
    assert stats["length_chars_kept"]["count"] == stats["rows_out"]
    assert stats["length_chars_kept"]["max"] <= 10_000 and stats["length_chars_kept"]["min"] >= 16


def test_stats_markdown_reports_every_filter_with_examples(prepared):
    out, stats = prepared
    report = (out / "stats.md").read_text(encoding="utf-8")
    for name, count in stats["removed"].items():
        assert f"| {name} | {count} |" in report
    assert "**near_duplicate**" in report and "control characters removed: 16 in 8 rows" in report
    assert all(len(found) <= prep.EXAMPLES_PER_FILTER for found in stats["removed_examples"].values())


def test_split_depends_only_on_the_text(tmp_path):
    texts = [f"Row number {i} says {i} + {i} = {2 * i}, in its own words." for i in range(200)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    subset = tmp_path / "s.jsonl"
    subset.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[::3][::-1]))
    stats = prep.prepare(corpus, tmp_path / "a", near_dup_threshold=None, split=(0.6, 0.2, 0.2))
    prep.prepare(subset, tmp_path / "b", near_dup_threshold=None, split=(0.6, 0.2, 0.2))
    where_a = {row["text"]: s for s in prep.SPLITS for row in read_jsonl(tmp_path / "a" / f"{s}.jsonl")}
    where_b = {row["text"]: s for s in prep.SPLITS for row in read_jsonl(tmp_path / "b" / f"{s}.jsonl")}
    assert all(where_a[text] == split for text, split in where_b.items())
    assert 90 <= stats["splits"]["train"] <= 150 and stats["splits"]["test"] > 20


def test_same_input_gives_identical_outputs(tmp_path):
    prep.prepare(CORPUS, tmp_path / "one")
    prep.prepare(CORPUS, tmp_path / "two")
    for name in (*prep.SPLITS, "removed"):
        assert (tmp_path / "one" / f"{name}.jsonl").read_bytes() == (tmp_path / "two" / f"{name}.jsonl").read_bytes()


def test_normalisation_and_quality_helpers():
    text, controls, nfkc = prep.normalize_text("  \uff11\uff12 apples\x07 and\u200b  ﬁve\t\tpears \r\n next ")
    assert text == "12 apples and five pears\nnext" and controls == 2 and nfkc
    assert prep.alnum_share("ab !!") == 0.5 and prep.alnum_share("   ") == 1.0
    assert prep.longest_run("abbbc") == 3 and prep.longest_run("") == 0
    assert prep.jaccard(prep.shingles("abcdefgh"), prep.shingles("abcdefgh")) == 1.0


def test_bad_arguments_are_errors_naming_the_option(tmp_path, align):
    with pytest.raises(DataError, match="--split"):
        prep.parse_split("0.9,0.2")
    with pytest.raises(DataError, match="no such input"):
        prep.prepare(tmp_path / "missing.jsonl", tmp_path / "out")
    assert align("data", "prepare", CORPUS, "--output", tmp_path, "--split", "1,1,1") == 2


def test_shipped_corpus_matches_its_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_raw_corpus", ROOT / "data/tiny_arith/make_raw_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "\n".join(module.build()) + "\n" == CORPUS.read_text(encoding="utf-8")
