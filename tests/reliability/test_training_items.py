"""Checklist items 22, 24, 27, 31, 32, 33: numerics, invariance, disk full, out of memory, unsafe checkpoints."""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch

from alignment.checkpoint import is_complete, latest_checkpoint
from alignment.errors import CheckpointError, TrainingError

from .conftest import chat_rows, logged, loss_curve, run_sft, write_jsonl

# ----------------------------------------------------------------------------- 22


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_item_22_equal_rewards_in_a_group_keep_advantages_finite(stage, tmp_path):
    from alignment import recipe as recipes
    from alignment.stages import online_rl

    (tmp_path / "constant.py").write_text(
        "def constant(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    recipe = recipes.load(f"recipes/tiny/{stage}.yaml", [
        "model.name_or_path=tiny:1m", "data.max_samples=16", "eval=null", "options.evaluate_before=false",
        "train.max_steps=1", "train.per_device_train_batch_size=8", "train.num_generations=4",
        "train.max_completion_length=4", "train.logging_steps=1", "train.save_steps=100", "train.disable_tqdm=true",
        f"output_dir={tmp_path / 'run'}", f"reward=[{{source: '{tmp_path}/constant.py:constant'}}]"])
    metrics = online_rl.run(recipe)
    records = [r for r in logged(tmp_path / "run") if "reward" in r]
    assert records, "the trainer logged no reward"
    for record in records:
        assert record["reward"] == 1.0 and record["reward_std"] == 0.0  # every group has zero spread
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), f"{key} = {value} with zero-std groups"
    assert math.isfinite(metrics["train_loss"])
    from policies import load

    trained, _ = load(str(tmp_path / "run"))
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def test_item_22_ppo_whitening_of_equal_values_is_finite():
    from alignment.ppo.losses import masked_whiten

    equal = torch.full((2, 3), 0.7)
    for mask in (torch.ones(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 0]])):
        assert torch.isfinite(masked_whiten(equal, mask)).all()


# ----------------------------------------------------------------------------- 24


def _poison_loss(monkeypatch, nan_steps):
    """Make the SFT loss NaN at the given optimizer steps (so every gradient of that step is NaN)."""
    from trl import SFTTrainer

    original = SFTTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step + 1 in nan_steps:
            if isinstance(result, tuple):
                return (result[0] * float("nan"),) + tuple(result[1:])
            return result * float("nan")
        return result

    monkeypatch.setattr(SFTTrainer, "compute_loss", compute_loss)


def test_item_24_nonfinite_gradient_step_is_skipped_and_counted(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _poison_loss(monkeypatch, nan_steps={2})
    run_dir = tmp_path / "run"
    metrics = run_sft(run_dir, "train.max_steps=3", "train.save_steps=1", "train.save_total_limit=5")
    assert metrics["train_steps"] == 3 and is_complete(run_dir)
    records = {r["step"]: r for r in logged(run_dir) if "loss" in r and "train_loss" not in r}
    assert math.isnan(records[2]["loss"]) and records[2]["nonfinite_skipped_steps"] == 1
    assert math.isfinite(records[3]["loss"]) and records[3]["nonfinite_skipped_steps"] == 1
    weights = [load_file(run_dir / f"checkpoints/checkpoint-{n}/model.safetensors") for n in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the NaN step must not move a weight"
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1]), "the next step trains again"
    assert all(torch.isfinite(v).all() for v in weights[2].values())


def test_item_24_aborts_after_k_nonfinite_steps_in_a_row(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, nan_steps=set(range(1, 100)))
    with pytest.raises(TrainingError, match="5 optimizer steps in a row had non-finite gradients"):
        run_sft(tmp_path, "train.max_steps=8")
    assert not is_complete(tmp_path)


# ----------------------------------------------------------------------------- 27 (and transformers PR #34191)


def test_item_27_batch_1_x_accumulation_8_equals_batch_8_x_accumulation_1(tmp_path):
    """Same rows per optimizer step, so the loss trajectory and the weights must agree.

    The answers have 1 to 4 digits, so the micro-batches of one step hold different numbers of trained tokens:
    averaging each micro-batch's loss and then the micro-batches (transformers before PR #34191) would differ.
    """
    from safetensors.torch import load_file

    rows = chat_rows(6, start=0) + chat_rows(5, start=100) + chat_rows(5, start=5000)
    data_file = write_jsonl(tmp_path / "train.jsonl", rows)
    assert len({len(r["completion"][0]["content"]) for r in rows}) == 4
    common = [f"data.train={data_file}", "data.max_samples=16", "train.max_steps=2", "train.learning_rate=1e-2",
              "train.warmup_steps=0", "train.lr_scheduler_type=constant"]
    run_sft(tmp_path / "b8", *common, "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1")
    run_sft(tmp_path / "b1", *common, "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=8")
    big, small = loss_curve(tmp_path / "b8"), loss_curve(tmp_path / "b1")
    assert sorted(big) == sorted(small) == [1, 2]
    for step in big:
        assert small[step] == pytest.approx(big[step], rel=1e-4), (step, big, small)
    norms = [{r["step"]: r["grad_norm"] for r in logged(tmp_path / name) if "grad_norm" in r} for name in ("b8", "b1")]
    for step in norms[0]:
        assert norms[1][step] == pytest.approx(norms[0][step], rel=1e-3)
    # Adam divides by sqrt(v): a gradient that is ~0 up to float noise can flip its update's sign, so the weights
    # are compared through the size of their whole update rather than element by element.
    import policies

    start = policies.load("tiny:1m", seed=42)[0].state_dict()
    a, b = load_file(tmp_path / "b8/model.safetensors"), load_file(tmp_path / "b1/model.safetensors")
    for key in a:
        moved = (a[key] - start[key]).norm()
        assert moved > 0 and (a[key] - b[key]).norm() <= 0.02 * moved, key


# ----------------------------------------------------------------------------- 31


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_item_31_disk_full_during_save_keeps_the_old_checkpoint_and_weights(tmp_path, monkeypatch):
    """A complete run is resumed for more steps; the disk fills up during a checkpoint save, then during the final
    save. Each time: a clear error, the last whole checkpoint and the old weights kept, the run not complete."""
    from pathlib import Path

    from transformers import PreTrainedModel, Trainer

    run_dir = tmp_path / "run"
    run_sft(run_dir, "train.max_steps=2", "train.save_steps=1")
    old_weights = (run_dir / "model.safetensors").read_bytes()
    save_rng_state, save_pretrained = Trainer._save_rng_state, PreTrainedModel.save_pretrained

    def checkpoint_save_fills_the_disk(self, output_dir, *args, **kwargs):
        if str(output_dir).endswith("checkpoint-4"):  # weights and optimizer written, then the disk is full
            _enospc()
        return save_rng_state(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_rng_state", checkpoint_save_fills_the_disk)
    with pytest.raises(CheckpointError, match=r"disk full .*half-written checkpoint-4 was removed.*checkpoint-3 is kept"):
        run_sft(run_dir, "train.max_steps=4", "train.save_steps=1", "resume=true")
    assert not is_complete(run_dir)
    assert latest_checkpoint(run_dir).name == "checkpoint-3" and not (run_dir / "checkpoints/checkpoint-4").exists()
    assert json.loads((run_dir / "checkpoints/checkpoint-3/trainer_state.json").read_text())["global_step"] == 3
    assert (run_dir / "model.safetensors").read_bytes() == old_weights
    monkeypatch.undo()

    def final_save_fills_the_disk(self, directory, *args, **kwargs):
        if ".staging-" in str(directory):  # the final save: half a file, then the disk is full
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "model.safetensors").write_bytes(b"half a file")
            _enospc()
        return save_pretrained(self, directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", final_save_fills_the_disk)
    with pytest.raises(CheckpointError, match=r"disk full .*weights already there are untouched.*not marked complete"):
        run_sft(run_dir, "train.max_steps=4", "train.save_steps=1", "resume=true")
    assert not is_complete(run_dir)
    assert not list(run_dir.glob(".staging-*")) and not list(run_dir.glob(".*.tmp-*"))
    assert (run_dir / "model.safetensors").read_bytes() == old_weights
    assert latest_checkpoint(run_dir).name == "checkpoint-4"  # the trainer's own last checkpoint is whole
    monkeypatch.undo()

    metrics = run_sft(run_dir, "train.max_steps=4", "train.save_steps=1", "resume=true")  # space freed: resume
    assert metrics["train_steps"] == 4 and is_complete(run_dir)
    assert (run_dir / "model.safetensors").read_bytes() != old_weights


def test_item_31_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    import os

    from alignment import checkpoint

    target = tmp_path / "run_info.json"
    checkpoint.write_json(target, {"complete": True})
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError):
        checkpoint.write_json(target, {"complete": False, "x": 1})
    assert json.loads(target.read_text()) == {"complete": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run_info.json"]


# ----------------------------------------------------------------------------- 32


def test_item_32_out_of_memory_names_batch_size_accumulation_and_length(tmp_path, monkeypatch):
    from trl import SFTTrainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SFTTrainer, "training_step", out_of_memory)
    with pytest.raises(TrainingError) as error:
        run_sft(tmp_path, "train.gradient_accumulation_steps=2", "train.max_length=128")
    message = str(error.value)
    for part in ("out of memory at training step 1", "per_device_train_batch_size=8",
                 "gradient_accumulation_steps=2", "max_length=128", "effective batch of 16"):
        assert part in message, message
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
    assert not is_complete(tmp_path)


def test_item_32_backend_runtime_errors_saying_out_of_memory_are_recognised():
    from alignment.guards import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: Out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ----------------------------------------------------------------------------- 33


def test_item_33_pickle_weights_refused_unless_the_recipe_allows_them(tiny_model_dir, tmp_path):
    import shutil

    from alignment import recipe as recipes
    from alignment.stages import common

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    base = ["eval=null", f"model.name_or_path={pickled}", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(CheckpointError, match=r"pickle weights \(pytorch_model.bin\)"):
        common.load_policy(recipes.load("recipes/tiny/sft.yaml", base))
    model, _ = common.load_policy(recipes.load("recipes/tiny/sft.yaml", base + ["model.allow_pickle=true"]))
    assert model.config.vocab_size > 0


def test_item_33_remote_code_never_runs_unless_the_recipe_turns_it_on(tiny_model_dir, tmp_path):
    import shutil

    from alignment import recipe as recipes
    from alignment.stages import common

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomModel"}
    config["model_type"] = "custom_tiny"  # an architecture transformers does not ship: only the repo's code has it
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code_ran"
    (custom / "custom_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_tiny'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    recipe = recipes.load("recipes/tiny/sft.yaml", ["eval=null", f"model.name_or_path={custom}",
                                                    f"output_dir={tmp_path / 'run'}"])
    assert recipe.model.trust_remote_code is False
    with pytest.raises(CheckpointError, match="ships its own Python code .*model.trust_remote_code: true"):
        common.load_policy(recipe)
    assert not marker.exists(), "remote code ran although trust_remote_code is off"


# ----------------------------------------------------------------------------- 24, 30, 31, 32 for every stage

@pytest.mark.parametrize("module", [
    "sft", "pretrain", "online_rl", "reward_model", "best_of_n", "dpo", "kto", "preference_relatives",
])
def test_items_24_30_31_32_every_trl_stage_trains_through_the_shared_guards(module):
    """The guards live in common.train; a stage that calls trainer.train() itself has none of them."""
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(f"alignment.stages.{module}"))
    # the preference stages train through preference_common.train, which calls common.train
    through = "pref.train(" if module in ("dpo", "kto", "preference_relatives") else "common.train("
    assert through in source and ".train(resume_from_checkpoint" not in source
    shared = inspect.getsource(importlib.import_module("alignment.stages.preference_common").train)
    assert "common.train(" in shared
