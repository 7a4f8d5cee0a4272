"""A finished tiny pipeline's runs directory (real stages, few steps), plus an interrupted and a failed run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# Few steps of each stage: enough for curves with several points and an evaluation with samples.
# SFT gets 300 steps so that some answers are right (the side-by-side filters then have rows to tell apart).
STAGES = {
    "sft": ("recipes/tiny/sft.yaml", {},
            ["data.max_samples=4000", "train.max_steps=300", "train.learning_rate=3.0e-3", "train.warmup_steps=20",
             "train.logging_steps=20", "train.save_steps=1000", "eval.max_samples=16", "options.evaluate_before=false"]),
    "ppo": ("recipes/tiny/ppo_rule.yaml", {"model.name_or_path": "sft"},
            ["train.total_steps=4", "train.batch_size=8", "train.mini_batch_size=4", "train.ppo_epochs=1",
             "train.logging_steps=1", "data.max_samples=32", "eval.max_samples=16", "eval.every_steps=2",
             "eval.during_max_samples=16", "options.save_steps=2", "options.evaluate_before=false",
             "options.progress_bar=false"]),
    "dpo": ("recipes/tiny/dpo.yaml", {"model.name_or_path": "sft"},
            ["train.max_steps=6", "train.per_device_train_batch_size=8", "train.logging_steps=1", "data.max_samples=64",
             "eval.max_samples=16", "options.kl_samples=8", "options.evaluate_before=false"]),
    "best_of_n": ("recipes/tiny/best_of_n.yaml", {"model.name_or_path": "sft"},
                  ["data.max_samples=8", "options.num_samples=4", "options.finetune=false", "options.write_samples=true",
                   "options.evaluate_before=false"]),
}


def write_pipeline(folder: Path) -> Path:
    lines = [f"# align pipeline {folder}/pipeline.yaml", f"output_root: {folder}/tiny", "stages:"]
    for name, (recipe, inputs, overrides) in STAGES.items():
        lines.append(f"  - {{name: {name}, recipe: {recipe}, inputs: {json.dumps(inputs)}, "
                     f"overrides: {json.dumps(overrides)}}}")
    lines += ["evaluate:", "  checkpoints: [sft, ppo, dpo]", "  baseline: sft", "  reference: sft",
              f"  spec: {folder}/eval.yaml"]
    (folder / "eval.yaml").write_text("data: data/tiny_arith/eval.jsonl\nmax_samples: 32\nmax_new_tokens: 6\n"
                                      "temperature: 1.0\nseed: 0\nrewards:\n  - source: answer_match\n"
                                      "judge: answer_match\nbootstrap_resamples: 100\nreport_samples: 12\n")
    path = folder / "pipeline.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_runs(folder: Path) -> Path:
    """Run the tiny pipeline into folder/tiny; add folder/ppo_interrupted and folder/dpo_failed beside it."""
    from alignment.pipeline import load_pipeline, run_pipeline

    run_pipeline(load_pipeline(write_pipeline(folder)))
    ppo = folder / "tiny" / "ppo"
    # Interrupted: what a kill after a checkpoint leaves (alignment.checkpoint): the recipe, the log, a complete
    # trainer checkpoint, and no run_info.json
    interrupted = folder / "ppo_interrupted"
    interrupted.mkdir()
    for name in ("recipe.yaml", "metrics.jsonl", "data_fingerprints.json"):
        shutil.copy(ppo / name, interrupted / name)
    shutil.copytree(ppo / "checkpoints", interrupted / "checkpoints")
    # Failed: stopped by an error before its first checkpoint
    failed = folder / "dpo_failed"
    failed.mkdir()
    shutil.copy(folder / "tiny" / "dpo" / "recipe.yaml", failed / "recipe.yaml")
    return folder


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, fresh_accelerate_state_module) -> Path:
    """Built fresh (about 2-3 minutes on 2 cores); $DASHBOARD_TEST_RUNS names a folder build_runs made earlier,
    to look again at the same runs without training them again."""
    prebuilt = os.environ.get("DASHBOARD_TEST_RUNS")
    if prebuilt:
        return Path(prebuilt)
    return build_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def fresh_accelerate_state_module():
    """PPO's accelerate state is a process-wide singleton: clean before and after the module's pipeline."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
