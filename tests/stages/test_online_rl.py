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


def test_health_problems_against_hand_worked_bounds():
    from alignment.guards import health_problems

    logged = {"kl": 0.31, "entropy": 0.05, "eos_rate": 0.5}
    bounds = [("kl", 0.3, "max"), ("entropy", 0.1, "min"), ("eos_rate", 0.5, "min"), ("missing", 1.0, "max"),
              ("kl", None, "min")]
    assert health_problems(logged, bounds) == ["kl = 0.31 is above 0.3", "entropy = 0.05 is below 0.1"]


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_health_threshold_stop_keeps_a_checkpoint_and_fails_the_run(stage, tmp_path):
    """An impossible entropy floor: the first log breaks it, training stops after saving, the run fails."""
    from alignment.checkpoint import latest_checkpoint
    from alignment.errors import TrainingError
    from alignment.stages import online_rl

    recipe = recipes.load(f"recipes/tiny/{stage}.yaml", TINY + [
        f"output_dir={tmp_path}", "train.max_steps=4", "train.save_steps=100", "eval=null",
        "options.min_entropy=1000.0", "options.warn_or_stop=stop"])
    with pytest.raises(TrainingError, match=r"RL health stopped the run at step 1: entropy = .* is below 1000"):
        online_rl.run(recipe)
    assert latest_checkpoint(tmp_path).name == "checkpoint-1" and not is_complete(tmp_path)


def test_health_threshold_warn_only_warns(tmp_path):
    from alignment.stages import online_rl

    recipe = recipes.load("recipes/tiny/grpo.yaml", TINY + [f"output_dir={tmp_path}", "eval=null",
                                                            "options.min_eos_rate=1.01"])
    with pytest.warns(RuntimeWarning, match=r"eos_rate = .* is below 1.01"):
        online_rl.run(recipe)
    assert is_complete(tmp_path)


@pytest.mark.slow
def test_demo_grpo_raises_greedy_accuracy(sft_run, tmp_path, assert_demo_gain):
    """recipes/tiny/grpo.yaml from the SFT checkpoint: held-out greedy accuracy +10 points, KL small."""
    from alignment.stages import online_rl

    sft_dir, _ = sft_run
    metrics = online_rl.run(recipes.load("recipes/tiny/grpo.yaml",
                                         [f"model.name_or_path={sft_dir}", f"output_dir={tmp_path}"]))
    assert_demo_gain(metrics)
    assert metrics["after"]["sampled_accuracy"] >= metrics["before"]["sampled_accuracy"]
    assert metrics["train_kl_per_token_last"] < 1.0


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_shared_prompt_log_probs_train_the_same_as_trl_alone(stage, tmp_path):
    """options.share_prompt packs each prompt's group of completions (alignment/shared_prompt.py): the same
    rewards, losses and weights as trl's own forward, with fewer decoder tokens."""
    from alignment.stages import online_rl
    from policies import load

    def run(setting):
        out = tmp_path / str(setting)
        recipe = recipes.load(f"recipes/tiny/{stage}.yaml", TINY + [
            f"output_dir={out}", "eval=null", "train.save_strategy='no'", "train.beta=0.04",
            # a reward that varies within a group: non-zero advantages, so every weight gets a real gradient
            # (with all-zero rewards the gradient is exactly 0 on one side and rounding noise on the other,
            # which Adam scales up to learning-rate-sized steps)
            "reward=[{source: 'examples/rewards/brevity.py:brevity'}]",
            f"options.share_prompt={str(setting).lower()}"])
        metrics = online_rl.run(recipe)
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        trained, _ = load(str(out))
        return metrics, [e for e in logged if "loss" in e], trained.state_dict()

    shared, shared_logs, shared_weights = run(True)
    plain, plain_logs, plain_weights = run(False)
    assert shared["share_prompt"] is True and plain["share_prompt"] is False
    assert shared["share_prompt_saved_fraction"] > 0.3, "4 completions of 4 tokens after a ~20-token prompt"
    assert len(shared_logs) == len(plain_logs) == 2
    for a, b in zip(shared_logs, plain_logs):
        assert a["reward"] == b["reward"], "same samples: generation is untouched"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-6)
    for name, weight in plain_weights.items():
        assert torch.allclose(shared_weights[name], weight, atol=1e-5), name
