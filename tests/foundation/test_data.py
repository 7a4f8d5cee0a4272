import json

import pytest

from alignment import data
from alignment.errors import DataError
from alignment.recipe import DataSpec


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_preference_row_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"p.jsonl:2: row 1: missing field 'rejected'"):
        data.load_rows(path, "preference")


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, '{"text": "broken'])
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        data.load_rows(path, "text")


def test_non_utf8_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8"):
        data.load_rows(str(path), "text")


def test_chosen_equal_rejected_dropped_and_counted(tmp_path):
    rows = [{"prompt": "q", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(99)]
    rows.append({"prompt": "q", "chosen": "same", "rejected": "same"})
    kept, report = data.load_rows(write_jsonl(tmp_path / "p.jsonl", rows), "preference")
    assert len(kept) == 99
    assert report.dropped == {"chosen == rejected": 1}


def test_too_many_dropped_rows_fail(tmp_path):
    rows = [{"prompt": "q", "chosen": "x", "rejected": "x"}] * 3 + [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match="3 of 4 rows dropped"):
        data.load_rows(write_jsonl(tmp_path / "p.jsonl", rows), "preference")


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        data.load_rows(str(tmp_path / "e.jsonl"), "sft")


def test_wrong_message_role(tmp_path):
    rows = [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DataError, match=r"row 0: field 'messages' message 0 has role 'human'"):
        data.load_rows(write_jsonl(tmp_path / "m.jsonl", rows), "sft")


def test_column_of_mixed_types_names_row(tmp_path):
    rows = [{"prompt": "q", "answer": 3}, {"prompt": "q", "answer": "three"}]
    with pytest.raises(DataError, match=r"row 1: field 'answer' is str"):
        data.load_rows(write_jsonl(tmp_path / "m.jsonl", rows), "prompt")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        data.load_rows(str(tmp_path / "nope.jsonl"), "text")


def test_csv_and_parquet_load(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    ds.to_csv(str(tmp_path / "s.csv"))
    ds.to_parquet(str(tmp_path / "s.parquet"))
    for name in ("s.csv", "s.parquet"):
        kept, _ = data.load_rows(str(tmp_path / name), "sft")
        assert kept == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def test_split_is_deterministic(repo_root):
    spec = DataSpec(train="data/tiny_arith/rl_prompts.jsonl", eval_fraction=0.1)
    first, second = data.load(spec, "prompt", seed=3), data.load(spec, "prompt", seed=3)
    assert len(first.eval) == 200 and len(first.train) == 1800
    assert first.eval["answer"] == second.eval["answer"]


def test_shipped_demo_files_are_valid_and_held_out_pairs_never_trained_on(repo_root):
    root = repo_root / "data/tiny_arith"
    formats = {"sft.jsonl": "sft", "preference.jsonl": "preference", "rl_prompts.jsonl": "prompt",
               "eval.jsonl": "prompt", "pretrain.jsonl": "text", "preference_eval.jsonl": "preference"}
    loaded = {name: data.load_rows(str(root / name), fmt)[0] for name, fmt in formats.items()}
    held_out = {row["prompt"][0]["content"] for row in loaded["eval.jsonl"]}
    assert len(held_out) == 500
    for name in ("sft.jsonl", "preference.jsonl", "rl_prompts.jsonl"):
        assert not held_out & {row["prompt"][0]["content"] for row in loaded[name]}, name
