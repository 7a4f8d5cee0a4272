"""`eval.every_steps`: held-out metrics logged mid-run, without changing what the run learns."""

import json
import math
import random

import numpy as np
import pytest
import torch

from alignment import recipe as recipes
from alignment.errors import RecipeError

SFT = [
    "model.name_or_path=tiny:1m",
    "data.max_samples=64",
    "eval.max_samples=8",
    "train.max_steps=4",
    "train.per_device_train_batch_size=8",
    "train.logging_steps=1",
    "train.save_steps=100",
    "train.warmup_steps=0",
    "options.evaluate_before=false",
]
PPO = [
    "model.name_or_path=tiny:1m",
    "data.max_samples=32",
    "eval.max_samples=8",
    "train.total_steps=4",
    "train.batch_size=8",
    "train.mini_batch_size=4",
    "train.ppo_epochs=1",
    "train.max_new_tokens=4",
    "train.learning_rate=1.0e-3",
    "options.save_steps=100",
    "options.evaluate_before=false",
    "options.progress_bar=false",
]
EVERY_2 = ["eval.every_steps=2", "eval.during_max_samples=6"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Each test gets its own accelerate state (see tests/conftest.py)."""


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_records(run_dir):
    return [r for r in records(run_dir) if any(k.startswith("eval/") for k in r)]


def training_values(run_dir, keys):
    """Every logged training number of the given keys, per step: what must not move."""
    return [(r["step"], k, r[k]) for r in records(run_dir) for k in keys if k in r]


def check_eval_entries(run_dir):
    entries = eval_records(run_dir)
    assert [e["step"] for e in entries] == [2, 4]
    for entry in entries:
        assert entry["eval/num_prompts"] == 6
        for key in ("eval/greedy_accuracy", "eval/sampled_accuracy"):
            assert math.isfinite(entry[key]) and 0.0 <= entry[key] <= 1.0, (key, entry)


def test_preserved_rng_leaves_every_generator_where_it_was():
    from alignment.stages.common import preserved_rng

    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = draw()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with preserved_rng():
        draw(), draw()
    assert draw() == expected


@pytest.mark.parametrize("override, pattern", [
    ("eval.every_steps=0", "every_steps: must be > 0"),
    ("eval.every_steps=two", "every_steps: expected an integer"),
    ("eval.during_max_samples=-3", "during_max_samples: must be > 0"),
    ("eval.every_step=2", "did you mean 'every_steps'"),
    ("eval.data=null", "every_steps needs eval.data"),
])
def test_bad_every_steps_settings_name_the_key(override, pattern):
    with pytest.raises(RecipeError, match=pattern):
        recipes.load("recipes/tiny/sft.yaml", SFT + ["eval.every_steps=2", override])


def test_sft_logs_held_out_metrics_every_n_steps_with_unchanged_losses(tmp_path):
    from alignment.stages import sft

    plain, checked = tmp_path / "plain", tmp_path / "checked"
    sft.run(recipes.load("recipes/tiny/sft.yaml", SFT + [f"output_dir={plain}"]))
    sft.run(recipes.load("recipes/tiny/sft.yaml", SFT + EVERY_2 + [f"output_dir={checked}"]))

    check_eval_entries(checked)
    assert eval_records(plain) == []
    keys = ("loss", "grad_norm")
    before, after = training_values(plain, keys), training_values(checked, keys)
    assert len(before) == 8 and [(s, k) for s, k, _ in before] == [(s, k) for s, k, _ in after]
    assert [v for *_, v in after] == pytest.approx([v for *_, v in before], rel=1e-6)


def test_ppo_logs_held_out_metrics_every_n_steps_with_unchanged_losses(tmp_path):
    from alignment.stages import ppo

    plain, checked = tmp_path / "plain", tmp_path / "checked"
    ppo.run(recipes.load("recipes/tiny/ppo_rule.yaml", PPO + [f"output_dir={plain}"]))
    metrics = ppo.run(recipes.load("recipes/tiny/ppo_rule.yaml", PPO + EVERY_2 + [f"output_dir={checked}"]))

    check_eval_entries(checked)
    assert metrics["train_steps"] == 4 and "train_reward_last" in metrics  # the eval records stay out of it
    keys = ("objective/score", "objective/kl", "value/loss", "policy/clipfrac")
    before, after = training_values(plain, keys), training_values(checked, keys)
    assert len(before) == 16 and [(s, k) for s, k, _ in before] == [(s, k) for s, k, _ in after]
    assert [v for *_, v in after] == pytest.approx([v for *_, v in before], rel=1e-6)
