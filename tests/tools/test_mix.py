"""`align data mix`: deterministic replay mixes, recorded in a sidecar."""

from __future__ import annotations

import json

import pytest

from alignment.errors import DataError
from alignment.tools.prepare import mix, sidecar_path


@pytest.fixture
def files(tmp_path):
    new = tmp_path / "new.jsonl"
    old = tmp_path / "old.jsonl"
    new.write_text("".join(json.dumps({"text": f"new {i}"}) + "\n" for i in range(80)))
    old.write_text("".join(json.dumps({"text": f"old {i}"}) + "\n" for i in range(300)))
    return new, old


def lines(path):
    return path.read_text().splitlines()


def test_same_seed_same_bytes_other_seed_other_mix(files, tmp_path):
    new, old = files
    mix(new, old, tmp_path / "a.jsonl", replay=0.2, seed=0)
    mix(new, old, tmp_path / "b.jsonl", replay=0.2, seed=0)
    mix(new, old, tmp_path / "c.jsonl", replay=0.2, seed=1)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_mix_holds_every_new_row_in_order_and_the_replay_share(files, tmp_path):
    new, old = files
    record = mix(new, old, tmp_path / "m.jsonl", replay=0.2, seed=0)
    out = lines(tmp_path / "m.jsonl")
    assert len(out) == 100 and record["replay_rows"] == 20 and record["actual_replay_share"] == 0.2
    assert [line for line in out if "new" in line] == lines(new)
    replayed = [line for line in out if "old" in line]
    assert len(set(replayed)) == 20 and set(replayed) <= set(lines(old))
    assert out[:20] != lines(new)[:20]  # replayed rows are spread through the file, not appended
    assert sorted(int(json.loads(line)["text"].split()[1]) + 1 for line in replayed) == record["replayed_old_lines"]


def test_sidecar_records_the_mix(files, tmp_path, align):
    new, old = files
    output = tmp_path / "mixed.jsonl"
    assert align("data", "mix", new, old, "--replay", "0.2", "--output", output, "--seed", "3") == 0
    record = json.loads(sidecar_path(output).read_text())
    assert record["seed"] == 3 and record["replay"] == 0.2 and record["new"]["rows"] == 80
    assert record["old"]["rows"] == 300 and record["total_rows"] == 100 and record["columns_match"]
    assert len(record["new"]["sha256"]) == 64 and len(record["output_sha256"]) == 64


def test_zero_replay_copies_new_and_too_little_old_data_is_an_error(files, tmp_path):
    new, old = files
    mix(new, old, tmp_path / "z.jsonl", replay=0.0)
    assert lines(tmp_path / "z.jsonl") == lines(new)
    with pytest.raises(DataError, match="needs 320 old rows"):
        mix(new, old, tmp_path / "x.jsonl", replay=0.8)
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        mix(new, old, tmp_path / "x.jsonl", replay=1.0)
