"""`align pipeline`: wiring, skipping finished stages, re-running changed ones, evaluation at the end."""

import json

import pytest

from alignment.errors import RecipeError
from alignment.pipeline import load_pipeline, run_pipeline

SMALL = {
    "sft": ["train.max_steps=4", "train.per_device_train_batch_size=8", "data.max_samples=64",
            "eval.max_samples=8", "train.save_steps=100", "options.evaluate_before=false"],
    "reward_model": ["train.max_steps=3", "train.num_train_epochs=1", "train.per_device_train_batch_size=8",
                     "data.max_samples=64", "options.center_samples=8"],
    "dpo": ["train.max_steps=3", "train.per_device_train_batch_size=8", "data.max_samples=64",
            "eval.max_samples=8", "options.kl_samples=8"],
    "ppo": ["train.total_steps=2", "train.batch_size=8", "train.mini_batch_size=4", "train.ppo_epochs=1",
            "eval.max_samples=8", "data.max_samples=16"],
}


def write_pipeline(tmp_path, sft_lr="3.0e-3"):
    def overrides(name, extra=()):
        return json.dumps(SMALL[name] + list(extra))

    text = f"""# align pipeline {tmp_path}/pipeline.yaml
output_root: {tmp_path}/runs
stages:
  - {{name: sft, recipe: recipes/tiny/sft.yaml, overrides: {overrides("sft", [f"train.learning_rate={sft_lr}"])}}}
  - {{name: reward_model, recipe: recipes/tiny/reward_model.yaml, inputs: {{model.name_or_path: sft}},
     overrides: {overrides("reward_model")}}}
  - {{name: ppo, recipe: recipes/tiny/ppo.yaml, overrides: {overrides("ppo")},
     inputs: {{model.name_or_path: sft, reward.0.source: reward_model, options.critic_init: reward_model}}}}
  - {{name: dpo, recipe: recipes/tiny/dpo.yaml, inputs: {{model.name_or_path: sft}}, overrides: {overrides("dpo")}}}
evaluate:
  checkpoints: [sft, dpo, ppo, reward_model]
  baseline: sft
  spec: {tmp_path}/eval.yaml
"""
    (tmp_path / "eval.yaml").write_text("data: data/tiny_arith/eval.jsonl\nmax_samples: 8\nmax_new_tokens: 4\n"
                                        "preference_data: data/tiny_arith/preference_eval.jsonl\n"
                                        "bootstrap_resamples: 100\n")
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_pipeline_runs_skips_and_reruns_changed_stages(tmp_path, capsys):
    first = run_pipeline(load_pipeline(write_pipeline(tmp_path)))
    runs = tmp_path / "runs"
    for name in ("sft", "reward_model", "ppo", "dpo"):
        assert (runs / name / "run_info.json").is_file(), name
        assert "skipped" not in first[name]
    info = json.loads((runs / "ppo" / "run_info.json").read_text())
    assert info["parent"]["model"] == str(runs / "sft") and info["parent"]["run_info_sha256"]
    report = json.loads((runs / "eval" / "report.json").read_text())
    assert set(report["checkpoints"]) == {"sft", "dpo", "ppo", "reward_model"}
    assert "preference_accuracy" in report["checkpoints"]["reward_model"]["metrics"]
    assert "kl_to_reference" in report["checkpoints"]["ppo"]["metrics"]

    again = run_pipeline(load_pipeline(write_pipeline(tmp_path)))
    assert all(again[name].get("skipped") for name in ("sft", "reward_model", "ppo", "dpo"))

    changed = run_pipeline(load_pipeline(write_pipeline(tmp_path, sft_lr="2.0e-3")))
    assert not any(changed[name].get("skipped") for name in ("sft", "reward_model", "ppo", "dpo"))


def test_pipeline_wiring_errors_name_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - {name: dpo, recipe: recipes/tiny/dpo.yaml, inputs: {model.name_or_path: sft}}\n")
    with pytest.raises(RecipeError, match=r"p.yaml:2: .*input 'sft' is not an earlier stage"):
        load_pipeline(path)


def test_pipeline_refuses_mismatched_tokenizers(tmp_path, monkeypatch):
    from alignment import pipeline

    hashes = iter([{"tokenizer": "a", "chat_template": "x"}, {"tokenizer": "b", "chat_template": "x"}])
    monkeypatch.setattr("alignment.checkpoint.tokenizer_hashes", lambda tok: next(hashes))
    path = tmp_path / "p.yaml"
    path.write_text(f"output_root: {tmp_path}\nstages:\n  - {{name: a, recipe: recipes/tiny/sft.yaml}}\n"
                    "  - {name: b, recipe: recipes/tiny/pretrain.yaml}\n")
    with pytest.raises(RecipeError, match="tokenizer or chat template differs"):
        pipeline.plan(load_pipeline(path))


def test_default_pipeline_validates(repo_root):
    from alignment.pipeline import DEFAULT_PIPELINE, plan

    planned = plan(load_pipeline(repo_root / DEFAULT_PIPELINE))
    assert [entry.name for entry, _ in planned][:2] == ["sft", "reward_model"]


def test_pipeline_seed_sets_every_stage_seed_unless_the_entry_names_its_own(tmp_path, repo_root):
    from alignment.pipeline import DEFAULT_PIPELINE, StageEntry, plan, resolve_stage

    default = plan(load_pipeline(repo_root / DEFAULT_PIPELINE))
    assert {recipe.seed for _, recipe in default} == {42}  # the recipes' own seed
    seeded = load_pipeline(repo_root / DEFAULT_PIPELINE, ["seed=3", f"output_root={tmp_path}"])
    assert seeded.seed == 3
    assert {recipe.seed for _, recipe in plan(seeded)} == {3}
    pinned = StageEntry("sft", "recipes/tiny/sft.yaml", overrides=["seed=7"])
    assert resolve_stage(seeded, pinned).seed == 7  # an entry's own override wins over the pipeline's seed
    with pytest.raises(RecipeError, match="seed"):
        load_pipeline(repo_root / DEFAULT_PIPELINE, ["seed=three"])


def test_pipeline_precision_sets_every_stage_precision_unless_the_entry_names_its_own(tmp_path, repo_root):
    from alignment.pipeline import DEFAULT_PIPELINE, StageEntry, plan, resolve_stage

    assert {recipe.precision for _, recipe in plan(load_pipeline(repo_root / DEFAULT_PIPELINE))} == {"auto"}
    forced = load_pipeline(repo_root / DEFAULT_PIPELINE, ["precision=bf16", f"output_root={tmp_path}"])
    assert forced.precision == "bf16"
    assert {recipe.precision for _, recipe in plan(forced)} == {"bf16"}
    pinned = StageEntry("sft", "recipes/tiny/sft.yaml", overrides=["precision=fp32"])
    assert resolve_stage(forced, pinned).precision == "fp32"  # an entry's own override wins
    with pytest.raises(RecipeError, match="precision"):
        load_pipeline(repo_root / DEFAULT_PIPELINE, ["precision=bf8"])
