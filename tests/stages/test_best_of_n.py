"""The `best_of_n` stage: N samples per prompt, scored by the recipe's rewards; best (and worst) kept; optional SFT."""

import json
import math

import pytest
import torch

from alignment import recipe as recipes
from alignment.checkpoint import is_complete

TINY = [
    "model.name_or_path=tiny:1m",
    "data.max_samples=12",
    "eval.max_samples=8",
    "options.num_samples=4",
    "options.max_new_tokens=8",
    "options.temperature=1.0",
    "options.min_score=null",
    "options.require_eos=false",  # a random model rarely stops within 8 tokens
    "options.evaluate_before=false",
    # brevity varies with the completion's length, so the samples of one prompt score differently
    "reward=[{source: 'examples/rewards/brevity.py:brevity'}]",
]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_best_of_n_writes_best_completions_and_ordered_pairs(tmp_path):
    from alignment import data
    from alignment.stages import best_of_n

    recipe = recipes.load("recipes/tiny/best_of_n.yaml",
                          TINY + [f"output_dir={tmp_path}", "options.finetune=false", "options.write_samples=true"])
    metrics = best_of_n.run(recipe)
    assert is_complete(tmp_path)

    best = read_jsonl(tmp_path / "best_of_n.jsonl")
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert 0 < len(best) <= 12 and len(samples) == 12 * 4
    for row in best:
        assert row["score"] >= row["mean_score"] - 1e-12
        same_prompt = [s["score"] for s in samples if s["prompt"] == row["prompt"] and s["score"] is not None]
        assert row["score"] == max(same_prompt)
        assert row["completion"][0]["role"] == "assistant"  # conversational prompts -> conversational completions
        assert "answer" in row  # the dataset's columns travel along
    stats = metrics["best_of_n"]
    assert stats["mean_best_score"] >= stats["mean_sample_score"]

    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert pairs, "a length-dependent reward gives some prompts samples of different scores"
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert len(pairs) + stats["tied_pairs"] + stats["no_candidate"] == 12

    # trl's formats, as the toolkit's own loaders validate them
    data.load_rows(str(tmp_path / "best_of_n.jsonl"), "sft")
    data.load_rows(str(tmp_path / "pairs.jsonl"), "preference")


def test_min_score_and_require_eos_filter_candidates(tmp_path):
    from alignment.stages import best_of_n

    recipe = recipes.load("recipes/tiny/best_of_n.yaml",
                          TINY + [f"output_dir={tmp_path}", "options.finetune=false", "options.min_score=2.0"])
    metrics = best_of_n.run(recipe)
    assert metrics["best_of_n"]["kept"] == 0  # brevity never exceeds 1.0
    assert metrics["best_of_n"]["below_min_score"] + metrics["best_of_n"]["no_candidate"] == 12
    assert (tmp_path / "best_of_n.jsonl").read_text() == ""


def test_finetune_on_the_best_saves_a_trained_policy(tmp_path):
    from transformers import AutoModelForCausalLM

    from alignment.stages import best_of_n
    from policies import load

    recipe = recipes.load("recipes/tiny/best_of_n.yaml", TINY + [
        f"output_dir={tmp_path}", "options.finetune=true", "train.max_steps=2", "train.per_device_train_batch_size=4",
        "train.logging_steps=1"])
    initial, _ = load("tiny:1m", seed=recipe.seed)
    metrics = best_of_n.run(recipe)
    assert is_complete(tmp_path)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values()))
    assert metrics["train_steps"] == 2 and math.isfinite(metrics["train_loss"])
    assert "greedy_accuracy" in metrics["after"]
    assert (tmp_path / "metrics.jsonl").is_file()


def test_finetune_with_nothing_kept_is_an_error(tmp_path):
    from alignment.errors import DataError
    from alignment.stages import best_of_n

    recipe = recipes.load("recipes/tiny/best_of_n.yaml",
                          TINY + [f"output_dir={tmp_path}", "options.finetune=true", "options.min_score=2.0"])
    with pytest.raises(DataError, match="nothing to fine-tune on"):
        best_of_n.run(recipe)
    assert not is_complete(tmp_path)
