"""A stage's tracker shows what its metrics.jsonl holds: a tiny PPO run (ours) and a tiny SFT run (trl's),
``train.report_to=tensorboard``, read back with tensorboard's own reader (EventAccumulator)."""

import json
import math

import numpy as np
import pytest

from alignment import recipe as recipes

from .test_tracking import event_scalars, needs

PPO_TINY = [  # tests/stages/test_ppo_stage.py's tiny run
    "model.name_or_path=tiny:1m", "data.max_samples=32", "eval.max_samples=8", "train.total_steps=3",
    "train.batch_size=8", "train.mini_batch_size=4", "train.ppo_epochs=1", "train.max_new_tokens=4",
    "train.learning_rate=1.0e-3", "train.logging_steps=1", "options.save_steps=1", "options.evaluate_before=false",
    "options.progress_bar=false", "eval.every_steps=2", "eval.during_max_samples=8",
]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Each run gets its own accelerate state (see tests/conftest.py)."""


def logged_series(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} of every numeric metric of metrics.jsonl, in the order written."""
    series = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            series.setdefault(key, []).append((record["step"], value))
    return series


def assert_tracker_matches_the_log(run_dir, expect: tuple[str, ...]):
    logged, seen = logged_series(run_dir), event_scalars(run_dir / "tensorboard")
    assert set(seen) == set(logged), (sorted(set(seen) ^ set(logged)))
    for name in expect:
        assert name in logged, name
    for name, points in logged.items():
        assert [s for s, _ in seen[name]] == [s for s, _ in points], name
        # an event file keeps a float32: the same number to float32 precision (a NaN stays a NaN)
        for (_, got), (_, want) in zip(seen[name], points):
            assert got == float(np.float32(want)) or (math.isnan(got) and math.isnan(want)), (name, got, want)


def test_ppo_run_with_tensorboard_logs_what_metrics_jsonl_holds(tmp_path):
    needs("tensorboard")
    from alignment.stages import ppo

    ppo.run(recipes.load("recipes/tiny/ppo_rule.yaml",
                         PPO_TINY + [f"output_dir={tmp_path}", "train.report_to=tensorboard"]))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert_tracker_matches_the_log(tmp_path, ("objective/kl", "objective/score", "kl/per_sequence", "kl/per_token",
                                              "reward/total", "reward/answer_match", "eval/greedy_accuracy"))
    steps = [s for s, _ in logged_series(tmp_path)["objective/kl"]]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_trl_sft_run_with_tensorboard_logs_what_metrics_jsonl_holds(tmp_path):
    needs("tensorboard")
    from alignment.stages import sft

    sft.run(recipes.load("recipes/tiny/sft.yaml", [
        f"output_dir={tmp_path}", "train.report_to=tensorboard", "data.max_samples=64", "train.max_steps=4",
        "train.logging_steps=1", "train.per_device_train_batch_size=8", "eval.max_samples=8",
        "options.evaluate_before=false"]))
    assert_tracker_matches_the_log(tmp_path, ("loss",))
    assert [s for s, _ in logged_series(tmp_path)["loss"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("stage, recipe, extra", [
    ("ppo", "recipes/tiny/ppo_rule.yaml", PPO_TINY),
    ("sft", "recipes/tiny/sft.yaml", ["data.max_samples=64", "train.max_steps=2"]),
])
def test_missing_tracker_package_stops_the_stage_before_any_model_loads(stage, recipe, extra, tmp_path, monkeypatch):
    import importlib
    import importlib.util

    import policies
    from alignment.errors import RecipeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracker check")

    monkeypatch.setattr(policies, "load", no_loading)
    module = importlib.import_module(f"alignment.stages.{stage}")
    with pytest.raises(RecipeError, match=r"wandb needs the 'wandb' package.*pip install -e '\.\[tracking\]'"):
        module.run(recipes.load(recipe, extra + [f"output_dir={tmp_path}", "train.report_to=wandb"]))
    assert not (tmp_path / "metrics.jsonl").exists()
