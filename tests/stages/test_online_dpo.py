"""The `online_dpo` stage (and the critic-free ppo recipes): recipe -> our loop -> a complete run directory."""

import json
import math

import pytest
import torch

from alignment import recipe as recipes
from alignment.checkpoint import is_complete
from alignment.errors import RecipeError

TINY = [
    "model.name_or_path=tiny:1m",
    "data.max_samples=32",
    "eval.max_samples=8",
    "train.total_steps=2",
    "train.batch_size=8",
    "train.mini_batch_size=4",
    "train.max_new_tokens=4",
    "train.learning_rate=1.0e-3",
    "options.save_steps=1",
    "options.evaluate_before=false",
    "options.progress_bar=false",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Each test gets its own accelerate state (see tests/conftest.py)."""


@pytest.mark.parametrize("name", ["online_dpo.yaml", "grpo_ours.yaml", "rloo_ours.yaml", "reinforce_pp.yaml"])
def test_recipes_validate_and_name_their_command(name, repo_root):
    path = repo_root / "recipes" / "tiny" / name
    assert path.read_text().splitlines()[0] == f"# align run recipes/tiny/{name}"
    recipes.load(path)


def test_online_dpo_stage_writes_a_complete_loadable_run(tmp_path):
    from transformers import AutoModelForCausalLM

    from alignment.stages import online_dpo
    from policies import load

    # a random model never answers right: rank by length instead (its samples differ there), no EOS penalty
    recipe = recipes.load("recipes/tiny/online_dpo.yaml", TINY + [
        f"output_dir={tmp_path}", "train.num_generations=4", "train.mini_batch_size=2", "train.missing_eos_penalty=null",
        "reward=[{source: length_target, kwargs: {target: 0}}]"])
    initial, _ = load("tiny:1m", seed=recipe.seed)
    metrics = online_dpo.run(recipe)
    assert is_complete(tmp_path) and not (tmp_path / "critic").exists()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert metrics["preference_judgements"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values()))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["dpo/pairs"] + line["dpo/tied_prompts"] == 2 for line in lines)  # 8 samples / 4 per prompt
    assert metrics["preference_judgements"] == sum(line["dpo/pairs"] for line in lines)
    assert metrics["stage"] == "online_dpo" and math.isfinite(metrics["train_kl_per_sequence_last"])
    with pytest.raises(RecipeError, match="vf_coef"):
        recipes.load("recipes/tiny/online_dpo.yaml", ["train.vf_coef=0.2"])


def test_grpo_recipe_builds_no_critic(tmp_path):
    from alignment.stages import ppo

    recipe = recipes.load("recipes/tiny/grpo_ours.yaml", TINY + [f"output_dir={tmp_path}", "train.num_generations=4"])
    metrics = ppo.run(recipe)
    assert is_complete(tmp_path) and metrics["critic"] is None
    assert not (tmp_path / "critic").exists() and not (tmp_path / "value_head.safetensors").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "policy/kl_loss" in lines[-1] and not any(key.startswith("value/") for key in lines[-1])
    with pytest.raises(RecipeError, match="critic_init"):
        ppo.check_options(recipes.load("recipes/tiny/grpo_ours.yaml", ["options.critic_init=runs/x"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo_ours.yaml", "reinforce_pp.yaml", "online_dpo.yaml"])
def test_demo_raises_greedy_accuracy(name, sft_run, tmp_path, assert_demo_gain):
    """Each recipe from the SFT checkpoint: held-out greedy accuracy +10 points, KL finite."""
    from alignment.stages import online_dpo, ppo

    sft_dir, _ = sft_run
    recipe = recipes.load(f"recipes/tiny/{name}", [f"model.name_or_path={sft_dir}", f"output_dir={tmp_path}"])
    assert_demo_gain((online_dpo if recipe.stage == "online_dpo" else ppo).run(recipe))
