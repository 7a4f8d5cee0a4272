"""Checklist items 11-16: recipes, command line, output paths, secrets, resume checks."""

from __future__ import annotations

import json
import os

import pytest

from alignment import recipe as recipes
from alignment.errors import CheckpointError, RecipeError

from .conftest import run_sft, sft_recipe, write_jsonl

SECRET = "hf_SECRETabc123"


# ----------------------------------------------------------------------------- 11


def test_item_11_unknown_key_names_file_line_and_closest_key(tmp_path):
    original = open("recipes/tiny/dpo.yaml").read()
    for typo, right, section in [("refrence", "reference", "options"), ("betta", "beta", "train"),
                                 ("max_sample", "max_samples", "data")]:
        text = original.replace(f"  {right}:", f"  {typo}:") if right in original else original.replace(
            "  train: data", f"  {typo}: 3\n  train: data")
        path = tmp_path / f"{typo}.yaml"
        path.write_text(text)
        line = next(i for i, text_line in enumerate(text.splitlines(), 1) if f"{typo}:" in text_line)
        with pytest.raises(RecipeError) as error:
            recipes.load(path)
        message = str(error.value)
        assert f"{typo}.yaml:{line}: {section}.{typo}: unknown key" in message, message
        assert f"did you mean {right!r}" in message, message


# ----------------------------------------------------------------------------- 12


@pytest.mark.parametrize(
    "recipe, override, pattern",
    [
        ("dpo", "train.learning_rate=0", r"train.learning_rate: must be > 0, got 0"),
        ("dpo", "train.beta=-0.1", r"train.beta: must be >= 0, got -0.1"),
        ("dpo", "train.learning_rate=.inf", r"train.learning_rate: must be a finite number"),
        ("dpo", "train.max_steps=1.5", r"train.max_steps: expected an integer"),
        ("dpo", "train.per_device_train_batch_size=[8]", r"per_device_train_batch_size: expected an integer"),
        ("sft", "model.lora={r: many}", r"model.lora.r: expected an integer, got str 'many'"),
        ("sft", "model.lora.dropout=1.0", r"model.lora.dropout: must be in \[0, 1\)"),
        ("sft", "data.max_samples=0", r"data.max_samples: must be > 0"),
        ("grpo", "train.num_generations=3",
         r"train.num_generations: per_device_train_batch_size \(64\) x processes \(1\) x "
         r"gradient_accumulation_steps \(1\) = 64 .* not divisible by num_generations \(3\)"),
        ("grpo", "train.generation_batch_size=20", r"generation_batch_size = 20 .*num_generations \(8\)"),
        ("sft", "train=[1, 2]", r"train: expected a mapping"),
        ("sft", "stage=kto_typo", r"unknown stage 'kto_typo'"),
    ],
)
def test_item_12_wrong_type_or_out_of_range_names_the_key(monkeypatch, recipe, override, pattern):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RecipeError, match=pattern) as error:
        recipes.load(f"recipes/tiny/{recipe}.yaml", [override])
    assert "command-line override" in str(error.value)


def test_item_12_divisible_batch_is_accepted(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = recipes.load("recipes/tiny/grpo.yaml", ["train.num_generations=4", "train.per_device_train_batch_size=6",
                                                      "train.gradient_accumulation_steps=2"])
    assert recipe.train["num_generations"] == 4
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched on 2 processes: 2 x 2 = 4 completions per generation batch
    assert recipes.load("recipes/tiny/grpo.yaml", ["train.num_generations=4", "train.per_device_train_batch_size=2"])


# ----------------------------------------------------------------------------- 13


def test_item_13_output_path_escaping_the_run_root_is_refused(tmp_path, monkeypatch):
    from alignment.stages.common import check_output_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "project"
    root.mkdir()
    (root / "runs").symlink_to(outside, target_is_directory=True)
    escaping = [sft_recipe(p) for p in ("../outside", "runs/sft", "runs", "a/../../outside")]
    inside, absolute = sft_recipe("fine/sft"), sft_recipe(str(outside))
    monkeypatch.chdir(root)
    for recipe in escaping:
        with pytest.raises(RecipeError, match="outside"):
            check_output_dir(recipe)
    assert str(check_output_dir(inside)) == "fine/sft"
    assert check_output_dir(absolute) == outside  # an absolute path is an explicit choice


# ----------------------------------------------------------------------------- 14


def test_item_14_secrets_never_in_saved_recipes_logs_or_trackers(tmp_path, capsys):
    run_dir = tmp_path / "run"
    recipe = sft_recipe(run_dir, f"train.hub_token={SECRET}", "train.save_steps=1",
                        f"reward=[{{source: 'http://user:{SECRET}@127.0.0.1:9/score', "
                        f"kwargs: {{api_key: {SECRET}}}}}]")
    assert SECRET not in recipe.resolved_yaml() and SECRET not in repr(recipe)
    from alignment.stages import sft

    sft.run(recipe)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the token leaked into {path}"
    assert (run_dir / "checkpoints/checkpoint-2/training_args.bin").is_file()
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    # what a tracker (wandb, tensorboard, ...) receives: the trainer's arguments as JSON
    from trl import SFTConfig

    from alignment.stages import common

    args = common.build_trainer_config(recipe, SFTConfig, common.trainer_defaults(recipe, tmp_path))
    assert args.hub_token == SECRET  # still handed to transformers, which needs it to push
    assert SECRET not in args.to_json_string() and SECRET not in json.dumps(args.to_sanitized_dict())


def test_item_14_secrets_never_in_error_messages_or_metrics(tmp_path):
    with pytest.raises(RecipeError) as error:
        recipes.load("recipes/tiny/sft.yaml", ["train.hub_token=[hf_SECRETabc123]"])
    assert SECRET not in str(error.value) and "***" in str(error.value)
    from alignment.metrics import MetricsLog
    from alignment.stages.common import metrics_logger

    class State:
        global_step, is_world_process_zero = 3, True

    metrics_logger(MetricsLog(tmp_path)).on_log(None, State(), None, logs={"loss": 1.0, "api_key": SECRET})
    written = (tmp_path / "metrics.jsonl").read_text()
    assert SECRET not in written and '"loss": 1.0' in written


# ----------------------------------------------------------------------------- 15


def test_item_15_resume_with_only_a_partial_checkpoint_is_an_error(tmp_path):
    partial = tmp_path / "checkpoints" / "checkpoint-6"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    (partial / "trainer_state.json").write_text('{"global_step": 6, "log_hi')  # cut mid-write
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run_sft(tmp_path, "resume=true")
    assert partial.is_dir()  # nothing deleted when nothing is resumed


# ----------------------------------------------------------------------------- 16


def _started_run(tmp_path, data_path, *overrides):
    """prepare_run_dir as a stage calls it, plus the checkpoint a first run would have left."""
    from alignment.stages.common import prepare_run_dir

    run_dir = tmp_path / "run"
    prepare_run_dir(sft_recipe(run_dir, f"data.train={data_path}", *overrides))
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return run_dir


@pytest.mark.parametrize("change", ["data file", "seed", "train.learning_rate", "data.max_samples"])
def test_item_16_resume_with_changed_data_seed_or_hyperparameters_is_refused_unless_forced(tmp_path, change):
    from alignment.stages.common import prepare_run_dir

    data_path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "completion": "A"}] * 4)
    run_dir = _started_run(tmp_path, data_path)
    overrides = [f"data.train={data_path}", "resume=true"]
    if change == "data file":
        write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "completion": "B"}] * 4)
    else:
        overrides.append({"seed": "seed=7", "train.learning_rate": "train.learning_rate=1e-5",
                          "data.max_samples": "data.max_samples=16"}[change])
    with pytest.raises(RecipeError, match=f"changed since it started: .*{change}"):
        prepare_run_dir(sft_recipe(run_dir, *overrides))
    _, resume_from = prepare_run_dir(sft_recipe(run_dir, *[o.replace("resume=true", "resume=force")
                                                           for o in overrides]))
    assert resume_from.endswith("checkpoint-2")


def test_item_16_unchanged_or_observational_changes_resume(tmp_path):
    from alignment.stages.common import prepare_run_dir

    data_path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "completion": "A"}] * 4)
    run_dir = _started_run(tmp_path, data_path)
    _, resume_from = prepare_run_dir(sft_recipe(run_dir, f"data.train={data_path}", "resume=true",
                                                "train.max_steps=9", "train.logging_steps=3"))
    assert resume_from.endswith("checkpoint-2")


def test_item_16_fresh_start_sets_older_checkpoints_aside(tmp_path):
    """A fresh run must never later resume from a checkpoint another run left in the same directory."""
    from alignment.checkpoint import latest_checkpoint
    from alignment.stages.common import prepare_run_dir

    data_path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "completion": "A"}] * 4)
    run_dir = _started_run(tmp_path, data_path)
    prepare_run_dir(sft_recipe(run_dir, f"data.train={data_path}"))  # resume not asked: a fresh start
    assert latest_checkpoint(run_dir) is None
    assert (run_dir / "checkpoints.previous" / "checkpoint-2" / "trainer_state.json").is_file()
    assert os.listdir(run_dir / "checkpoints.previous") == ["checkpoint-2"]
