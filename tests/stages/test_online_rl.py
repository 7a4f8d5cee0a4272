"""GRPO and RLOO stages through trl, on reward sources named only in the recipe."""

import json

import pytest
import torch

from alignment import recipe as recipes
from alignment.checkpoint import is_complete

TINY = [
    "model.name_or_path=tiny:1m",
    "data.max_samples=32",
    "eval.max_samples=8",
    "train.max_steps=2",
    "train.per_device_train_batch_size=8",
    "train.num_generations=4",
    "train.max_completion_length=4",
    "train.logging_steps=1",
    "train.save_steps=2",
    "options.evaluate_before=false",
]


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_stage_trains_with_an_external_reward_file(stage, tmp_path):
    from alignment.stages import online_rl
    from policies import load

    overrides = TINY + [f"output_dir={tmp_path}", "reward=[{source: 'examples/rewards/brevity.py:brevity'}, "
                        "{source: answer_match, weight: 2.0}]"]
    recipe = recipes.load(f"recipes/tiny/{stage}.yaml", overrides)
    initial, _ = load("tiny:1m", seed=recipe.seed)
    metrics = online_rl.run(recipe)
    assert is_complete(tmp_path)
    trained, _ = load(str(tmp_path))
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values()))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    brevity = [entry for entry in logged if "rewards/brevity/mean" in entry]
    assert brevity, "the external reward named only in the recipe must have been called and logged"
    assert all(0.0 <= entry["rewards/brevity/mean"] <= 1.0 for entry in brevity)
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert metrics["reward_failures"]["brevity"]["failures"] == 0


def test_recipe_without_reward_is_refused(tmp_path):
    from alignment.errors import RecipeError

    with pytest.raises(RecipeError, match="list at least one reward source"):
        recipes.load("recipes/tiny/grpo.yaml", ["reward=[]"])
