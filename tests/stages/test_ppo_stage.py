"""The `ppo` stage: recipe -> our PPOTrainer -> a complete, loadable run directory; resume; SIGTERM; demo."""

import json
import math
import os
import signal

import pytest
import torch

from alignment import recipe as recipes
from alignment.checkpoint import is_complete, latest_checkpoint
from tests.float_noise import is_float32_noise

TINY = [
    "model.name_or_path=tiny:1m",
    "data.max_samples=32",
    "eval.max_samples=8",
    "train.total_steps=3",
    "train.batch_size=8",
    "train.mini_batch_size=4",
    "train.ppo_epochs=1",
    "train.max_new_tokens=4",
    "train.learning_rate=1.0e-3",
    "options.save_steps=1",
    "options.evaluate_before=false",
    "options.progress_bar=false",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Each test gets its own accelerate state (see tests/conftest.py)."""


def load_ppo(overrides):
    return recipes.load("recipes/tiny/ppo_rule.yaml", TINY + overrides)


def log_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("critic", ["value_head", "separate"])
def test_stage_writes_a_complete_loadable_run(critic, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignment.stages import ppo
    from policies import load
    from policies.value import CausalLMWithValueHead

    recipe = load_ppo([f"output_dir={tmp_path}", f"options.critic={critic}"])
    initial, _ = load("tiny:1m", seed=recipe.seed)
    metrics = ppo.run(recipe)

    assert is_complete(tmp_path)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers, no value head inside
    AutoTokenizer.from_pretrained(tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values()))
    if critic == "value_head":
        assert (tmp_path / "value_head.safetensors").is_file()
        CausalLMWithValueHead.from_pretrained(tmp_path)
    else:
        assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic").config.num_labels == 1

    lines = log_lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        for key in ("objective/kl", "objective/score", "objective/entropy", "policy/clipfrac", "value/loss",
                    "val/eos_rate", "reward/answer_match", "time/generation", "time/training"):
            assert math.isfinite(line[key]), key
    assert is_float32_noise(lines[0]["objective/kl"])  # same temperature everywhere: policy == reference at step 0

    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["checkpoint-2", "checkpoint-3"]  # save_steps=1, the last two kept
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["train_steps"] == 3 and written["critic"] == critic
    for key in ("train_reward_first", "train_reward_last", "train_kl_per_sequence_last", "train_kl_per_token_last"):
        assert math.isfinite(written[key])
    assert set(written["time_split"]) == {"generation", "scoring", "training"}
    assert "greedy_accuracy" in written["after"]
    assert metrics["summary"].startswith("ppo done")


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from alignment.guards import Interrupted
    from alignment.ppo import PPOTrainer
    from alignment.stages import ppo

    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    ppo.run(load_ppo([f"output_dir={straight_dir}", "options.save_steps=10"]))

    original_step = PPOTrainer.step
    handler_before = signal.getsignal(signal.SIGTERM)  # CI harnesses may install their own

    def step_then_sigterm(self):
        metrics = original_step(self)
        if self.step_count == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run: the step finishes, then the stage stops
        return metrics

    monkeypatch.setattr(PPOTrainer, "step", step_then_sigterm)
    with pytest.raises(Interrupted, match="SIGTERM"):
        ppo.run(load_ppo([f"output_dir={stopped_dir}", "options.save_steps=10"]))
    monkeypatch.setattr(PPOTrainer, "step", original_step)
    assert not is_complete(stopped_dir)
    assert latest_checkpoint(stopped_dir).name == "checkpoint-1"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers restored

    ppo.run(load_ppo([f"output_dir={stopped_dir}", "options.save_steps=10", "resume=true"]))
    assert is_complete(stopped_dir)
    assert [line["step"] for line in log_lines(stopped_dir)] == [1, 2, 3]
    from safetensors.torch import load_file

    a, b = load_file(str(straight_dir / "model.safetensors")), load_file(str(stopped_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    straight_log, resumed_log = log_lines(straight_dir), log_lines(stopped_dir)
    assert [x["objective/score"] for x in straight_log] == [x["objective/score"] for x in resumed_log]


def test_resume_drops_log_lines_after_the_checkpoint(tmp_path):
    from alignment.stages import ppo

    ppo.run(load_ppo([f"output_dir={tmp_path}", "options.save_steps=2"]))  # checkpoints 2 and 3 (the end)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-3")  # as if killed after step 3 was logged
    ppo.run(load_ppo([f"output_dir={tmp_path}", "options.save_steps=2", "resume=true"]))
    assert [line["step"] for line in log_lines(tmp_path)] == [1, 2, 3]


def test_lora_policy_uses_the_disabled_adapter_as_reference_and_saves_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    from alignment.stages import ppo

    metrics = ppo.run(load_ppo([f"output_dir={tmp_path}", "model.lora={r: 4, alpha: 8}"]))
    assert is_complete(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()  # merged into a plain model
    AutoModelForCausalLM.from_pretrained(tmp_path)
    assert is_float32_noise(log_lines(tmp_path)[0]["objective/kl"])
    assert math.isfinite(metrics["train_kl_per_sequence_last"])


def test_learned_reward_model_as_reward_and_critic_init(tmp_path):
    """A reward-model directory works as a reward source and as the separate critic's starting point."""
    from alignment.stages import ppo
    from policies import load

    lm_dir, rm_dir = tmp_path / "lm", tmp_path / "rm"
    lm, tokenizer = load("tiny:1m", seed=7)
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    rm, _ = load(str(lm_dir), task="sequence_classification")  # a random score head: an untrained reward model
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    out = tmp_path / "run"
    recipe = load_ppo([f"output_dir={out}", f"reward=[{{source: '{rm_dir}'}}]", "options.critic=separate",
                       f"options.critic_init={rm_dir}"])
    metrics = ppo.run(recipe)
    assert is_complete(out)
    lines = log_lines(out)
    assert all(math.isfinite(line["reward/rm"]) for line in lines)
    assert metrics["reward_failures"]["rm"]["failures"] == 0
    critic_rm = load(str(out / "critic"), task="sequence_classification")[0]
    changed = any(not torch.equal(a, b) for a, b in zip(rm.state_dict().values(), critic_rm.state_dict().values()))
    assert changed, "the critic started from the reward model and was trained"


def test_bad_settings_are_refused_before_loading(tmp_path):
    from alignment.errors import RecipeError
    from alignment.stages import ppo

    with pytest.raises(RecipeError, match="critic_init"):
        ppo.run(load_ppo([f"output_dir={tmp_path}", f"options.critic_init={tmp_path}"]))
    with pytest.raises(RecipeError, match="mini_batch_size"):
        ppo.run(load_ppo([f"output_dir={tmp_path}", "train.mini_batch_size=3"]))
    with pytest.raises(RecipeError, match="did you mean 'kl_coef'"):
        load_ppo(["train.kl_coeff=0.1"])
    with pytest.raises(RecipeError, match="value_head"):
        load_ppo(["options.critic=value"])


@pytest.mark.parametrize("name", ["ppo.yaml", "ppo_rule.yaml", "best_of_n.yaml"])
def test_recipes_validate_and_name_their_command(name, repo_root):
    path = repo_root / "recipes" / "tiny" / name
    assert path.read_text().splitlines()[0] == f"# align run recipes/tiny/{name}"
    recipes.load(path)


@pytest.mark.slow
def test_demo_ppo_rule_raises_greedy_accuracy(sft_run, tmp_path, assert_demo_gain):
    """recipes/tiny/ppo_rule.yaml from the SFT checkpoint: held-out greedy accuracy +10 points, KL bounded."""
    from alignment.stages import ppo

    sft_dir, _ = sft_run
    metrics = ppo.run(recipes.load("recipes/tiny/ppo_rule.yaml",
                                   [f"model.name_or_path={sft_dir}", f"output_dir={tmp_path}"]))
    assert_demo_gain(metrics)
    assert metrics["train_kl_per_sequence_max"] < 10.0
