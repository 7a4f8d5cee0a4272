"""Continued training: a stage starts from an earlier run directory, with a replay mix, and records its parent."""

from __future__ import annotations

import hashlib
import json

from alignment.checkpoint import is_complete, read_json

FAST = ["train.max_steps=4", "train.logging_steps=2", "train.save_steps=4", "data.max_samples=256",
        "eval.max_samples=16", "eval.sampled=false", "train.per_device_train_batch_size=8"]


def test_a_stage_continues_from_an_earlier_run_with_replay(tmp_path, repo_root, align):
    sft_rows = (repo_root / "data/tiny_arith/sft.jsonl").read_text().splitlines(keepends=True)
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    new.write_text("".join(sft_rows[:200]))
    old.write_text("".join(sft_rows[5000:5400]))
    mixed = tmp_path / "mixed.jsonl"
    assert align("data", "mix", new, old, "--replay", "0.2", "--output", mixed, "--seed", "0") == 0

    first, second = tmp_path / "first", tmp_path / "second"
    assert align("run", "recipes/tiny/sft.yaml", *FAST, f"output_dir={first}") == 0
    assert align("run", "recipes/tiny/sft.yaml", *FAST, f"output_dir={second}", f"model.name_or_path={first}",
                 f"data.train={mixed}") == 0
    assert is_complete(first) and is_complete(second)

    info = read_json(second / "run_info.json")
    assert info["parent"] == {"model": str(first), "stage": "sft",
                              "run_info_sha256": hashlib.sha256((first / "run_info.json").read_bytes()).hexdigest()}
    assert str(mixed) in info["data"]  # the replay mix is part of the lineage (its sidecar says how it was made)
    assert read_json(first / "run_info.json")["parent"] == {"model": "tiny:1m"}
    # The second run started from the first run's weights: its "before" is the first run's "after".
    before = json.loads((second / "metrics.json").read_text())["before"]
    after_first = json.loads((first / "metrics.json").read_text())["after"]
    assert before["greedy_accuracy"] == after_first["greedy_accuracy"]
    assert before["greedy_mean_length"] == after_first["greedy_mean_length"]
