"""The preference stages end to end on the tiny recipes (tiny random model, a few steps), and the real demo (slow)."""

import json

import pytest
import torch

from alignment import recipe as recipes
from alignment.checkpoint import is_complete, read_json

FAST = [
    "model.name_or_path=tiny:1m",
    "data.max_samples=48",
    "eval.max_samples=8",
    "options.kl_samples=4",
    "train.max_steps=2",
    "train.per_device_train_batch_size=8",
    "train.logging_steps=1",
    "train.save_steps=2",
]


@pytest.fixture
def small_eval(tmp_path, repo_root):
    """The first 16 held-out pairs (scoring all 500 twice is the slow part of a tiny run)."""
    lines = (repo_root / "data/tiny_arith/preference_eval.jsonl").read_text().splitlines()[:16]
    path = tmp_path / "pairs_eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def load(name, tmp_path, small_eval, *extra):
    return recipes.load(f"recipes/tiny/{name}.yaml", FAST + [f"output_dir={tmp_path / 'run'}",
                                                              f"data.eval={small_eval}", *extra])


def changed_parameters(run_dir, seed):
    from transformers import AutoModelForCausalLM

    import policies

    initial, _ = policies.load("tiny:1m", seed=seed)
    trained = AutoModelForCausalLM.from_pretrained(run_dir)
    return [k for k, v in trained.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]


def test_dpo_stage_writes_preference_metrics_and_a_complete_checkpoint(tmp_path, small_eval):
    from alignment.stages import dpo

    recipe = load("dpo", tmp_path, small_eval)
    metrics = dpo.run(recipe)
    run_dir = tmp_path / "run"
    assert is_complete(run_dir) and read_json(run_dir / "run_info.json")["stage"] == "dpo"
    assert changed_parameters(run_dir, recipe.seed)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["loss_type"] == ["sigmoid", "sft"] and saved["reference"] == "copy"
    assert torch.isfinite(torch.tensor(saved["train_loss"]))
    before, after = saved["heldout_before"], saved["heldout_after"]
    assert before["pairs"] == after["pairs"] == 16
    for key in ("preference_accuracy", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected",
                "drift_chosen", "drift_rejected"):
        assert key in after, key
    assert after["drift_abs"] > 0, "two steps at the recipe's learning rate must move the policy"
    assert saved["kl_to_start"]["n"] == 4
    assert "greedy_accuracy" in saved["before"] and "sampled_accuracy" in saved["after"]
    train_report = saved["data"][0]
    assert train_report["rows_read"] == 48 and set(train_report) >= {"dropped", "truncated_to_max_length"}
    assert train_report["rows_kept"] == 48 - sum(train_report["dropped"].values())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in entry for entry in logged)
    assert any("heldout/preference_accuracy" in entry for entry in logged)
    assert metrics["summary"].startswith("dpo done")


def test_dpo_with_lora_keeps_no_copy_and_saves_merged_weights(tmp_path, small_eval):
    from alignment.stages import dpo

    recipe = load("dpo", tmp_path, small_eval, "model.lora={r: 4, alpha: 8}", "options.evaluate_before=false")
    metrics = dpo.run(recipe)
    assert metrics["reference"] == "adapter"
    # the KL reference is the adapter switched off, after the policy (adapter on) was sampled and scored
    assert metrics["kl_to_start"]["k3"] > 0 and metrics["heldout_after"]["drift_abs"] > 0
    assert changed_parameters(tmp_path / "run", recipe.seed), "the merged adapter must change the saved weights"
    assert not list((tmp_path / "run").glob("adapter_*")), "the checkpoint is a plain model, the adapter merged in"


def test_ipo_recipe_is_the_dpo_stage_with_the_ipo_loss(tmp_path, small_eval):
    from alignment.stages import dpo

    metrics = dpo.run(load("ipo", tmp_path, small_eval, "options.evaluate_before=false", "options.kl_samples=0"))
    assert metrics["loss_type"][0] == "ipo" and metrics["kl_to_start"] is None


def test_kto_stage_trains_on_pairs_split_into_labelled_rows(tmp_path, small_eval):
    from alignment.stages import kto

    recipe = load("kto", tmp_path, small_eval, "options.evaluate_before=false")
    metrics = kto.run(recipe)
    report = metrics["data"][0]
    assert report["unpaired_rows"] == 2 * report["rows_kept"]
    assert metrics["desirable_rows"] == metrics["undesirable_rows"] == report["rows_kept"]
    assert metrics["heldout_after"]["pairs"] == 16
    assert is_complete(tmp_path / "run") and changed_parameters(tmp_path / "run", recipe.seed)


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_stage_runs_from_its_recipe(name, tmp_path, small_eval):
    from alignment.stages import preference_relatives

    recipe = load(name, tmp_path, small_eval, "options.evaluate_before=false")
    metrics = preference_relatives.run(recipe)
    assert metrics["experimental_trainer"].startswith("trl.experimental.")
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert metrics["heldout_after"]["drift_abs"] > 0
    assert is_complete(tmp_path / "run") and changed_parameters(tmp_path / "run", recipe.seed)


def test_simpo_stage_refuses_another_cpo_loss():
    from alignment.errors import RecipeError
    from alignment.stages.preference_relatives import stage_defaults

    with pytest.raises(RecipeError, match="use stage cpo"):
        stage_defaults(recipes.load("recipes/tiny/simpo.yaml", ["train.loss_type=hinge"]))


def test_preference_recipes_validate_and_start_with_their_command(repo_root):
    from alignment.cli import validate_file

    for name in ("dpo", "ipo", "kto", "orpo", "simpo"):
        path = repo_root / "recipes/tiny" / f"{name}.yaml"
        assert path.read_text().splitlines()[0] == f"# align run recipes/tiny/{name}.yaml"
        assert validate_file(path).startswith("stage ")
        recipe = recipes.load(path)
        assert recipe.model.name_or_path == "runs/tiny/sft" and recipe.output_dir == f"runs/tiny/{name}"


@pytest.mark.slow
def test_tiny_dpo_recipe_beats_the_sft_model(sft_run, tmp_path):
    """The demo: DPO from the SFT checkpoint lifts held-out greedy accuracy by >= 10 points."""
    from alignment.stages import dpo

    sft_dir, _ = sft_run
    metrics = dpo.run(recipes.load("recipes/tiny/dpo.yaml", [f"model.name_or_path={sft_dir}",
                                                               f"output_dir={tmp_path}"]))
    before, after = metrics["before"]["greedy_accuracy"], metrics["after"]["greedy_accuracy"]
    assert after >= before + 0.10, (before, after)
    assert metrics["heldout_after"]["preference_accuracy"] > metrics["heldout_before"]["preference_accuracy"]
    assert metrics["heldout_after"]["reward_margin"] > 0


@pytest.mark.parametrize("name", ["dpo", "kto", "simpo"])
def test_sigterm_mid_run_saves_a_checkpoint_and_the_run_resumes(name, tmp_path, small_eval, monkeypatch):
    """The preference stages train through common.train: a signal finishes the step, saves, stops unfinished."""
    import os
    import signal

    import transformers

    from alignment.checkpoint import latest_checkpoint
    from alignment.guards import Interrupted
    from alignment.stages import dpo, kto, preference_relatives

    stage = {"dpo": dpo, "kto": kto, "simpo": preference_relatives}[name]
    original = transformers.Trainer.training_step

    def step_then_sigterm(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if self.state.global_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # the first step finishes, then the stage saves and stops
        return loss

    monkeypatch.setattr(transformers.Trainer, "training_step", step_then_sigterm)
    overrides = ["train.max_steps=3", "train.save_steps=10"]
    with pytest.raises(Interrupted, match="SIGTERM"):
        stage.run(load(name, tmp_path, small_eval, *overrides))
    run_dir = tmp_path / "run"
    assert not is_complete(run_dir) and latest_checkpoint(run_dir).name == "checkpoint-1"

    monkeypatch.setattr(transformers.Trainer, "training_step", original)
    metrics = stage.run(load(name, tmp_path, small_eval, *overrides, "resume=true"))
    assert is_complete(run_dir) and metrics["train_steps"] == 3
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]  # step 1 before the stop, 2-3 after
