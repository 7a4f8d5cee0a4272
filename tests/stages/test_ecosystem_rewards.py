"""Rewards from trl, verl and OpenRLHF in the tiny PPO and GRPO stages, named only in the recipe, each logged."""

import json
import math

import pytest

from alignment import recipe as recipes

# Every trl.rewards function (the factories built with kwargs), a verl compute_score and an OpenRLHF reward_func.
SOURCES = (
    "reward=["
    "{source: 'trl.rewards:think_format_reward'},"
    "{source: 'trl.rewards:accuracy_reward', columns: {solution: answer}},"
    "{source: 'trl.rewards:reasoning_accuracy_reward', columns: {solution: answer}},"
    "{source: 'trl.rewards:get_cosine_scaled_reward', factory: true, kwargs: {max_len: 4}, columns: {solution: answer}},"
    "{source: 'trl.rewards:get_repetition_penalty_reward', factory: true, kwargs: {ngram_size: 2}},"
    "{source: 'trl.rewards:get_soft_overlong_punishment', factory: true,"
    " kwargs: {max_completion_len: 4, soft_punish_cache: 2}},"
    "{source: 'examples/rewards/verl_compute_score.py:compute_score', columns: {ground_truth: answer}},"
    "{source: 'examples/rewards/openrlhf_reward_func.py:reward_func', columns: {labels: answer}},"
    "{source: answer_match}]"
)
ALWAYS_APPLY = ["think_format_reward", "reasoning_accuracy_reward", "get_repetition_penalty_reward",
                "get_soft_overlong_punishment", "compute_score", "reward_func", "answer_match"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Each test gets its own accelerate state (see tests/conftest.py)."""


def flatten(tree, out=None):
    """Every leaf of nested dicts by its own key (the innermost name)."""
    out = {} if out is None else out
    for key, value in tree.items():
        if isinstance(value, dict):
            flatten(value, out)
        else:
            out[key] = value
    return out


def log_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ppo_stage_scores_with_every_ecosystem_form(tmp_path):
    from alignment.stages import ppo

    overrides = ["model.name_or_path=tiny:1m", "data.max_samples=8", "eval.max_samples=4", "train.total_steps=1",
                 "train.batch_size=4", "train.mini_batch_size=4", "train.ppo_epochs=1", "train.max_new_tokens=4",
                 "options.save_steps=1", "options.evaluate_before=false", "options.progress_bar=false",
                 f"output_dir={tmp_path}", SOURCES, "eval.rewards=[{source: answer_match}, "
                 "{source: 'trl.rewards:get_soft_overlong_punishment', factory: true, "
                 "kwargs: {max_completion_len: 4, soft_punish_cache: 2}}]"]
    metrics = ppo.run(recipes.load("recipes/tiny/ppo_rule.yaml", overrides))
    found = flatten(metrics)
    # the held-out eval passes its sampled ids too: all 6 tokens long (past max_completion_len 4) -> trl's -1
    assert found["greedy_mean_length"] == 6.0 and found["greedy/reward/get_soft_overlong_punishment"] == -1.0
    assert found["greedy/reward/get_soft_overlong_punishment/failures"] == 0.0
    step = [entry for entry in log_lines(tmp_path) if "step" in entry][-1]
    for name in ALWAYS_APPLY:
        assert math.isfinite(step[f"reward/{name}"]), name
        assert step[f"reward/{name}/failures"] == 0.0, name
    # the answer column holds integers, which math_verify cannot parse as a gold answer: "does not apply"
    assert "reward/accuracy_reward" not in step and step["reward/accuracy_reward/failures"] == 0.0
    assert -1.0 <= step["reward/get_soft_overlong_punishment"] <= 0.0  # read from the sampled completion_ids
    assert 0.0 <= step["reward/compute_score"] <= 1.0 and 0.0 <= step["reward/reward_func"] <= 1.0
    assert step["reward/reward_func/query_chars"] > len("What is 0 + 0?")  # OpenRLHF's extra_logs, logged


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_online_rl_stage_scores_with_every_ecosystem_form(stage, tmp_path):
    from alignment.stages import online_rl

    overrides = ["model.name_or_path=tiny:1m", "data.max_samples=8", "eval.max_samples=4", "train.max_steps=1",
                 "train.per_device_train_batch_size=4", "train.num_generations=4", "train.max_completion_length=4",
                 "train.logging_steps=1", "train.save_steps=1", "options.evaluate_before=false",
                 f"output_dir={tmp_path}", SOURCES]
    metrics = online_rl.run(recipes.load(f"recipes/tiny/{stage}.yaml", overrides))
    logged = [entry for entry in log_lines(tmp_path) if "rewards/answer_match/mean" in entry]
    assert logged, "trl logs each source's mean"
    entry = logged[-1]
    for name in ALWAYS_APPLY:
        assert math.isfinite(entry[f"rewards/{name}/mean"]), name
        assert metrics["reward_failures"][name]["failures"] == 0, name
    assert -1.0 <= entry["rewards/get_soft_overlong_punishment/mean"] <= 0.0


def test_best_of_n_scores_with_every_ecosystem_form(tmp_path):
    from alignment.stages import best_of_n

    overrides = ["model.name_or_path=tiny:1m", "data.max_samples=4", "eval.max_samples=4", "options.num_samples=2",
                 "options.max_new_tokens=4", "options.min_score=null", "options.require_eos=false",
                 "options.evaluate_before=false", "options.finetune=false", "options.write_samples=true",
                 f"output_dir={tmp_path}", SOURCES]
    metrics = best_of_n.run(recipes.load("recipes/tiny/best_of_n.yaml", overrides))
    rewards = metrics["rewards"]
    for name in ALWAYS_APPLY:
        assert math.isfinite(rewards[f"reward/{name}"]), name
        assert metrics["reward_failures"][name] == {"calls": 1, "failures": 0, "invalid_scores": 0,
                                                    "skipped_samples": 0, "consecutive_failures": 0}, name
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    # the overlong punishment reads the sampled ids: each sample's own length, (4 - 2 - len) / 2 when over 2
    assert rewards["reward/get_soft_overlong_punishment"] <= 0.0
    assert rewards["reward/reward_func/query_chars"] > len("What is 0 + 0?")


def test_eval_scores_with_every_ecosystem_form(tmp_path):
    from alignment.evaluation.runner import evaluate_checkpoints
    from tests.evaluation.conftest import save_tiny_checkpoints

    rewards = SOURCES.removeprefix("reward=")
    paths, spec = save_tiny_checkpoints(tmp_path / "ckpts", "data: data/tiny_arith/eval.jsonl\nmax_samples: 4\n"
                                        f"max_new_tokens: 4\nbatch_size: 4\nperplexity: false\nrewards: {rewards}\n")
    evaluate_checkpoints(paths, spec_path=str(spec), output_dir=tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "report.json").read_text())["checkpoints"]["base"]["metrics"]
    for name in ALWAYS_APPLY:
        assert metrics["reward"][name]["n"] == 4 and metrics["reward"][name]["n_none"] == 0, name
    assert metrics["mean_length"] == 4.0 and metrics["greedy_eos_rate"] == 0.0
    # 4 tokens, none an EOS, past max_completion_len - soft_punish_cache = 2: (2 - 4) / 2 = -1, from the ids
    assert metrics["reward"]["get_soft_overlong_punishment"]["mean"] == -1.0
    assert metrics["reward"]["accuracy_reward"]["n_none"] == 4  # integer answers: not a gold math_verify parses
