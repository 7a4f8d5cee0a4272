"""Round two of the reliability checklist (items 35-46 of RELIABILITY.md; issue 17).

Each test pins one fix: it failed on the code before the fix.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import write_jsonl


@pytest.fixture(autouse=True)
def _release_run_locks():
    """A stage holds its run directory's lock until the process ends; tests end sooner."""
    yield
    from alignment import checkpoint

    for run_dir in list(checkpoint._LOCKS):
        checkpoint.unlock_run_dir(run_dir)


# ----------------------------------------------------------------------------- 35 (issue item 1): repeated pairs


def _pair_recipe(tmp_path, rows, *overrides):
    from alignment import recipe as recipes

    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return recipes.load("recipes/tiny/dpo.yaml", [f"data.train={train}", "data.eval=null", "eval=null",
                                                  f"output_dir={tmp_path / 'run'}", *overrides])


def _votes():
    """One prompt, repeated Bradley-Terry votes: 'a' beats 'b' 3 times, 'b' beats 'a' once, 'a' beats 'c' twice."""
    row = lambda chosen, rejected: {"prompt": "Q: pick", "chosen": f" {chosen}", "rejected": f" {rejected}"}  # noqa: E731
    return [row("a", "b")] * 3 + [row("b", "a")] + [row("a", "c")] * 2


def test_item_35_repeated_preference_rows_are_kept_by_default_and_counted(tmp_path, tiny_tokenizer):
    from alignment.stages.preference_common import prepare_pairs

    pairs = prepare_pairs(_pair_recipe(tmp_path, _votes()), tiny_tokenizer, 64)
    report = pairs.reports[0]
    assert len(pairs.train) == 6 and report["rows_kept"] == 6, report  # the votes carry the label frequencies
    assert "duplicate pair" not in report["dropped"]
    # a > b three times: 2 exact repeats; a > c twice: 1 repeat; a > b and b > a: 4 rows contradict another
    assert report["repeats"] == {"exact repeats": 3, "contradictory rows": 4}, report


def test_item_35_deduplication_is_opt_in_and_still_counts(tmp_path, tiny_tokenizer):
    from alignment.stages.preference_common import prepare_pairs

    pairs = prepare_pairs(_pair_recipe(tmp_path, _votes(), "options.drop_duplicates=true"), tiny_tokenizer, 64)
    report = pairs.reports[0]
    assert len(pairs.train) == 3 and report["dropped"]["duplicate pair"] == 3, report
    assert report["repeats"] == {"exact repeats": 3, "contradictory rows": 4}, report


# ----------------------------------------------------------------------------- 46 (issue item 12): safetensors first


def test_item_46_safetensors_are_preferred_even_when_pickle_is_allowed(tmp_path):
    import torch

    import policies

    model, tokenizer = policies.load("tiny:1m", seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    other = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    torch.save(other, tmp_path / "pytorch_model.bin")  # a different (pickled) copy beside the safetensors
    loaded, _ = policies.load(str(tmp_path), allow_pickle=True, device="cpu", dtype="float32")
    first = next(iter(model.state_dict()))
    assert torch.equal(loaded.state_dict()[first], model.state_dict()[first]), "the pickle was loaded"


# ----------------------------------------------------------------------------- 38 (issue item 4): no silent switch-off


def _config_with_an_unresolvable_hint():
    """A trainer config whose hints do not all resolve (like a trl config naming an optional package's type)."""
    import dataclasses

    namespace: dict = {}
    exec("from __future__ import annotations\nimport dataclasses\n"  # noqa: S102 - a class with a string hint
         "@dataclasses.dataclass\nclass SomeConfig:\n    learning_rate: float = 1e-3\n"
         "    callbacks: NotInstalledType | None = None\n", namespace)
    assert dataclasses.is_dataclass(namespace["SomeConfig"])
    return namespace["SomeConfig"]


def test_item_38_an_unresolvable_type_hint_does_not_switch_the_type_checks_off():
    from alignment import recipe as recipes
    from alignment.errors import RecipeError

    config = _config_with_an_unresolvable_hint()
    locations = recipes.Locations("r.yaml")
    with pytest.warns(RuntimeWarning, match="callbacks"):
        with pytest.raises(RecipeError, match="learning_rate"):
            recipes.validate_train_section({"learning_rate": "fast"}, config, locations)


def test_item_38_sft_token_audit_without_labels_is_an_error():
    from types import SimpleNamespace

    import datasets

    from alignment.errors import TrainingError
    from alignment.stages.common import audit_sft_tokens

    trainer = SimpleNamespace(train_dataset=datasets.Dataset.from_list([{"input_ids": [1, 2, 3]}]))
    with pytest.raises(TrainingError, match="labels"):
        audit_sft_tokens(trainer, SimpleNamespace(), Path("."))


# ----------------------------------------------------------------------------- 39 (issue item 5): interrupted exit code


def test_item_39_an_interrupted_run_exits_with_the_documented_resumable_code(monkeypatch, capsys):
    from alignment import cli
    from alignment.guards import EXIT_INTERRUPTED, Interrupted

    def interrupted_run(args):
        raise Interrupted("stopped by SIGTERM; checkpoint saved; run again with --resume")

    monkeypatch.setattr(cli, "cmd_run", interrupted_run)
    assert EXIT_INTERRUPTED == 75
    assert cli.main(["run", "recipes/tiny/sft.yaml"]) == EXIT_INTERRUPTED  # so `align run a && align run b` stops
    assert "resumable" in capsys.readouterr().err


# A pipeline whose stages are replaced by fakes that record how they were asked to run.

def _fake_stage(calls: list, name: str, interrupt: bool = False):
    from alignment.checkpoint import write_json
    from alignment.guards import Interrupted

    def run(recipe):
        calls.append((name, recipe.resume, getattr(recipe, "overwrite", None)))
        out = Path(recipe.output_dir)
        (out / "checkpoints" / "checkpoint-4").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
        if interrupt:
            raise Interrupted(f"stopped by SIGTERM during {name}")
        write_json(out / "run_info.json", {"stage": recipe.stage, "complete": True, "finished_at": time.time()})
        return {"summary": f"{name} done"}

    return run


def _fake_pipeline(tmp_path, monkeypatch, calls, interrupt_dpo=False, data=None):
    from alignment.stages import dpo, sft

    monkeypatch.setattr(sft, "run", _fake_stage(calls, "sft"))
    monkeypatch.setattr(dpo, "run", _fake_stage(calls, "dpo", interrupt=interrupt_dpo))
    sft_overrides = json.dumps([f"data.train={data}"] if data else [])
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"output_root: {tmp_path}/runs\nstages:\n"
                    f"  - {{name: sft, recipe: recipes/tiny/sft.yaml, overrides: {sft_overrides}}}\n"
                    "  - {name: dpo, recipe: recipes/tiny/dpo.yaml, inputs: {model.name_or_path: sft}}\n")
    return path


def test_item_39_the_pipeline_stops_at_an_interrupted_stage_exits_75_and_records_it(tmp_path, monkeypatch):
    from alignment import cli
    from alignment.guards import EXIT_INTERRUPTED

    calls = []
    path = _fake_pipeline(tmp_path, monkeypatch, calls, interrupt_dpo=True)
    assert cli.main(["pipeline", str(path)]) == EXIT_INTERRUPTED
    state = json.loads((tmp_path / "runs" / "pipeline_state.json").read_text())
    assert state["sft"]["status"] == "done" and state["dpo"]["status"] == "interrupted", state


# ----------------------------------------------------------------------------- 40 (issue item 6): unfinished runs


def _unfinished_run(tmp_path, tiny_model_dir):
    """What an interrupted run leaves: the weights of its start, recipe.yaml, checkpoints, no run_info.json."""
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(tiny_model_dir, run)
    (run / "recipe.yaml").write_text("stage: sft\n")
    shutil.copytree(tiny_model_dir, run / "checkpoints" / "checkpoint-2")
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    return run


def test_item_40_exporting_or_loading_an_unfinished_run_is_an_error_unless_a_checkpoint_is_named(
        tmp_path, tiny_model_dir):
    from alignment.checkpoint import require_finished_run
    from alignment.errors import CheckpointError
    from alignment.tools.export import load_source

    run = _unfinished_run(tmp_path, tiny_model_dir)
    with pytest.raises(CheckpointError, match=r"unfinished run.*checkpoint-2"):
        load_source(str(run))
    with pytest.raises(CheckpointError, match="unfinished run"):
        require_finished_run(str(run))  # what every stage checks its model.name_or_path with
    model, _, _ = load_source(str(run / "checkpoints" / "checkpoint-2"))  # named explicitly: allowed
    assert model is not None
    require_finished_run(str(tiny_model_dir))  # a plain model directory is not a run directory


# ----------------------------------------------------------------------------- 41 (issue item 7): never overwritten


def _prepare(tmp_path, *overrides):
    from alignment import recipe as recipes
    from alignment.stages import common

    recipe = recipes.load("recipes/tiny/sft.yaml", [f"output_dir={tmp_path / 'run'}", *overrides])
    return common.prepare_run_dir(recipe)


def test_item_41_a_fresh_run_into_a_finished_run_is_refused_unless_overwrite(tmp_path):
    from alignment.checkpoint import write_json
    from alignment.errors import CheckpointError

    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "run_info.json", {"complete": True})
    with pytest.raises(CheckpointError, match="--overwrite"):
        _prepare(tmp_path)
    assert (run / "run_info.json").is_file()  # untouched
    _prepare(tmp_path, "overwrite=true")


def test_item_41_forgetting_resume_twice_keeps_the_first_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    first = run / "checkpoints" / "checkpoint-7"
    first.mkdir(parents=True)
    (first / "trainer_state.json").write_text('{"run": "first"}')
    _prepare(tmp_path)  # forgot --resume once
    second = run / "checkpoints" / "checkpoint-1"
    second.mkdir(parents=True)
    (second / "trainer_state.json").write_text('{"run": "second"}')
    _prepare(tmp_path)  # and again
    kept = sorted(p.read_text() for p in run.glob("checkpoints*/checkpoint-*/trainer_state.json"))
    assert kept == ['{"run": "first"}', '{"run": "second"}'], kept


def test_item_41_pipeline_force_retrains_instead_of_resuming(tmp_path, monkeypatch):
    from alignment.pipeline import load_pipeline, run_pipeline

    calls = []
    path = _fake_pipeline(tmp_path, monkeypatch, calls)
    run_pipeline(load_pipeline(path))
    calls.clear()
    run_pipeline(load_pipeline(path), force=["sft"])
    assert calls[0] == ("sft", False, True), calls  # fresh (not resume=true), allowed to replace the finished run


def test_item_41_pipeline_fingerprint_covers_data_contents_and_reward_code(tmp_path, monkeypatch):
    from alignment import recipe as recipes
    from alignment.pipeline import StageEntry, fingerprint, load_pipeline, run_pipeline

    data = tmp_path / "sft.jsonl"
    data.write_text(Path("data/tiny_arith/sft.jsonl").read_text().splitlines()[0] + "\n")
    calls = []
    path = _fake_pipeline(tmp_path, monkeypatch, calls, data=data)
    run_pipeline(load_pipeline(path))
    data.write_text(Path("data/tiny_arith/sft.jsonl").read_text().splitlines()[1] + "\n")  # same name, new rows
    calls.clear()
    run_pipeline(load_pipeline(path))
    assert [c[0] for c in calls] == ["sft", "dpo"], "a changed data file was skipped as finished"

    code = tmp_path / "my_reward.py"
    code.write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    recipe = recipes.load("recipes/tiny/ppo_rule.yaml", [f"reward=[{{source: '{code}:score'}}]"])
    pipeline = load_pipeline(path)
    entry = StageEntry("ppo", "recipes/tiny/ppo_rule.yaml")
    before = fingerprint(recipe, entry, pipeline)
    code.write_text("def score(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    assert fingerprint(recipe, entry, pipeline) != before, "a changed reward code file kept the fingerprint"


# ----------------------------------------------------------------------------- 42 (issue item 8): real disk full


@pytest.fixture
def small_filesystem(tmp_path):
    """A 6 MB tmpfs: room for one tiny:1m model (4.3 MB of safetensors), not for a second copy beside it."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:  # not root, or no mount namespace: test_item_42_real_exception_types covers the types
        if os.environ.get("CI"):  # CI runs as root: there a failed mount is a broken test, not a skip
            pytest.fail(f"cannot mount a small tmpfs in CI: {done.stderr.decode().strip()}")
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_item_42_a_real_full_disk_during_the_final_save_keeps_the_old_weights_and_no_staging(small_filesystem):
    import policies
    from alignment import recipe as recipes
    from alignment.checkpoint import is_complete, mark_incomplete, save_run
    from alignment.errors import CheckpointError

    run = small_filesystem / "run"
    recipe = recipes.load("recipes/tiny/sft.yaml", [f"output_dir={run}"])
    model, tokenizer = policies.load("tiny:1m", seed=1)
    save_run(run, model=model, tokenizer=tokenizer, recipe=recipe, run_info={}, metrics={})
    old = (run / "model.safetensors").read_bytes()
    mark_incomplete(run)  # a new run starts in the directory
    with pytest.raises(CheckpointError, match="disk full"):  # safetensors raises SafetensorError, not OSError
        save_run(run, model=policies.load("tiny:1m", seed=2)[0], tokenizer=tokenizer, recipe=recipe, run_info={},
                 metrics={})
    assert (run / "model.safetensors").read_bytes() == old
    assert not list(run.glob(".staging-*")), "the staging folder was left on the full disk"
    assert not is_complete(run)


def test_item_42_real_exception_types_of_a_full_disk_are_recognised(small_filesystem):
    import safetensors.torch
    import torch

    from alignment.checkpoint import write_failure_reason

    big = {"w": torch.zeros(2 << 20)}  # 8 MB
    caught = []
    for write in (lambda: safetensors.torch.save_file(big, str(small_filesystem / "a.safetensors")),
                  lambda: torch.save(big, small_filesystem / "b.pt")):
        with pytest.raises(Exception) as info:
            write()
        caught.append(info.value)
    assert not any(isinstance(e, OSError) for e in caught), caught  # why an OSError handler missed them
    assert "disk full" in write_failure_reason(caught[0])
    assert "torch.save could not write" in write_failure_reason(caught[1])
    assert write_failure_reason(RuntimeError("shape mismatch")) is None  # other errors are not write failures


def test_item_42_a_stale_staging_folder_is_removed_when_the_next_run_starts(tmp_path):
    run = tmp_path / "run"
    stale = run / ".staging-12345"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    ppo_stale = run / "checkpoints" / "checkpoint-3.tmp"
    ppo_stale.mkdir(parents=True)
    _prepare(tmp_path)
    assert not stale.exists() and not ppo_stale.exists()


def test_item_42_weights_are_fsynced_before_run_info_marks_the_run_complete(tmp_path, monkeypatch):
    import policies
    from alignment import checkpoint
    from alignment import recipe as recipes

    run = tmp_path / "run"
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((name, (run / "run_info.json").exists()))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", recording_fsync)
    model, tokenizer = policies.load("tiny:1m", seed=1)
    checkpoint.save_run(run, model=model, tokenizer=tokenizer,
                        recipe=recipes.load("recipes/tiny/sft.yaml", [f"output_dir={run}"]), run_info={}, metrics={})
    weights = [complete for name, complete in synced if name == str(run / "model.safetensors")]
    directory = [complete for name, complete in synced if name == str(run)]
    assert weights == [False] and directory and not directory[0], synced


# ----------------------------------------------------------------------------- 43 (issue item 9): hangs, health, OOM, lock


def test_item_43_a_second_run_on_the_same_output_directory_is_refused(tmp_path):
    import subprocess
    import sys

    from alignment.errors import CheckpointError

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from alignment.checkpoint import lock_run_dir;"
                               f" lock_run_dir({str(run)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid}"):
            _prepare(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    _prepare(tmp_path)  # the lock went with the process


def test_item_43_out_of_memory_in_the_ppo_loop_and_in_evaluation_names_what_to_lower(monkeypatch):
    from types import SimpleNamespace

    import torch

    from alignment.errors import TrainingError
    from alignment.evaluation import runner
    from alignment.stages.ppo import ppo_step

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer = SimpleNamespace(step=oom, step_count=4, config=SimpleNamespace(
        batch_size=64, mini_batch_size=8, gradient_accumulation_steps=1, max_new_tokens=64))
    with pytest.raises(TrainingError, match=r"out of memory at PPO step 5 .*train.mini_batch_size=8"):
        ppo_step(trainer)
    monkeypatch.setattr(runner, "_evaluate_policy_checkpoint", oom)
    with pytest.raises(TrainingError, match=r"out of memory at evaluating ckpt with batch_size=16"):
        runner.evaluate_policy_checkpoint("ckpt", SimpleNamespace(batch_size=16, max_new_tokens=8), [], None)


# ----------------------------------------------------------------------------- 36 (issue item 2): failed is not 0


def _two_sources(on_error="skip"):
    import reward

    def exact(prompts, completions, **kw):
        return [0.0 if c == "n/a" else 1.0 for c in completions]

    def judge(prompts, completions, **kw):  # fails (NaN) on "bad", does not apply (None) to "n/a"
        return [float("nan") if c == "bad" else None if c == "n/a" else 0.5 for c in completions]

    from reward.registry import register

    register("r2_exact")(exact)
    register("r2_judge")(judge)
    return reward.build([{"source": "r2_exact", "weight": 1.0},
                         {"source": "r2_judge", "weight": 2.0, "on_error": on_error}])


def test_item_36_a_failed_source_drops_the_sample_instead_of_adding_zero():
    combined = _two_sources()
    result = combined(["p"] * 3, ["ok", "bad", "n/a"])
    assert result.total[0] == pytest.approx(1.0 + 2 * 0.5)
    assert result.total[1] is None, "the failed judge was read as 0: total = 1 * exact only"
    assert result.total[2] == 0.0  # "does not apply" is not a failure: the others still sum
    assert result.dropped == [1] and result.metrics["reward/dropped_samples"] == 1.0
    assert result.failed == {"r2_exact": [], "r2_judge": [1]}


def test_item_36_reweight_is_explicit_and_spreads_the_failed_weight_over_the_sources_that_applied():
    result = _two_sources(on_error="reweight")(["p"] * 2, ["ok", "bad"])
    assert result.total[0] == pytest.approx(2.0)
    assert result.total[1] == pytest.approx(1.0 * (1.0 + 2.0) / 1.0) and result.dropped == []  # exact stands in
    assert result.metrics["reward/reweighted_samples"] == 1.0
    from reward.combine import failure_scale

    assert failure_scale([1.0, 2.0], [False, True], [True, False], [False, True]) == pytest.approx(3.0)
    assert failure_scale([1.0, 2.0], [False, True], [True, False], [False, False]) is None
    assert failure_scale([1.0, 2.0], [False, False], [True, False], [False, False]) == 1.0


def test_item_36_grpo_and_rloo_drop_a_sample_whose_source_failed_instead_of_nansumming_it_to_zero():
    import math

    import torch
    import trl

    from alignment.stages.online_rl import drop_or_reweight_failures, trainer_class

    combined = _two_sources()
    combined(["p"] * 3, ["ok", "bad", "n/a"])  # what trl's _calculate_rewards does: each source on the batch
    # trl's matrix for that batch: None (and a skipped failure) arrive as NaN
    rewards_per_func = torch.tensor([[1.0, 0.5], [1.0, math.nan], [0.0, math.nan]])
    out, dropped = drop_or_reweight_failures(rewards_per_func, combined, n_local=3, process_index=0)
    assert dropped == 1 and torch.isnan(out[1]).all(), out  # every entry NaN: trl's "unscorable", advantage 0
    assert out[0].tolist() == [1.0, 0.5] and out[2, 0] == 0.0  # "does not apply" keeps the other source
    for base in (trl.GRPOTrainer, trl.RLOOTrainer):  # the stage's trainers (with and without sharing) apply it
        for sharing in (False, True):
            assert trainer_class(base, sharing)._calculate_rewards is not base._calculate_rewards


def test_item_36_evaluation_says_how_many_samples_failed_instead_of_shrinking_the_denominator_silently():
    from alignment.evaluation.runner import sample_metrics
    from reward.combine import RewardResult

    result = RewardResult(total=[1.0, None, 0.0], per_source={"answer_match": [1.0, None, 0.0]},
                          failed={"answer_match": [1]})
    samples = [{"ended_with_eos": True}] * 3
    metrics = sample_metrics("greedy", samples, result)
    assert metrics["greedy_accuracy"] == 0.5
    assert metrics["greedy_accuracy_scored"] == 2 and metrics["greedy_accuracy_failed"] == 1, metrics
    assert metrics["greedy_reward_failures"] == {"answer_match": 1}


# ----------------------------------------------------------------------------- 37 (issue item 3): one pooling rule


def test_item_37_training_and_scoring_read_the_reward_at_the_same_token_when_pad_is_eos(tmp_path, tiny_model_dir):
    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import RewardConfig

    import policies
    from alignment.stages.reward_model import trainer_class
    from reward.model import RewardModel
    from tests.reliability.conftest import model_dir_with_tokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token
    rm_dir = model_dir_with_tokenizer(tiny_model_dir, tmp_path / "rm", pad_token=eos)  # GPT-2 / Pythia style
    model, tokenizer = policies.load(str(rm_dir), task="sequence_classification", device="cpu", dtype="float32")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(rm_dir)
    pairs = datasets.Dataset.from_list([{"chosen": "What is 2 + 2? 4", "rejected": "What is 2 + 2? 5 and more"}])
    trainer = trainer_class(share_prompt=False)(
        model=model, processing_class=tokenizer, train_dataset=pairs,
        args=RewardConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_length=64))
    batch = trainer.data_collator([trainer.train_dataset[0]])  # chosen and rejected, right-padded with EOS
    assert batch["input_ids"][0, batch["attention_mask"][0].sum() - 1] == tokenizer.eos_token_id
    trainer.model.eval()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    trained = outputs.logits.squeeze(-1).tolist()

    scorer = RewardModel(str(rm_dir), device="cpu", bias=0.0)
    served = [scorer._score_ids([ids[mask.bool()].tolist()])[0]
              for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert trained == pytest.approx(served, abs=1e-5), "training and scoring read different tokens"


# ----------------------------------------------------------------------------- 44 (issue item 10): isolation


ESCAPING = "tests/reward/fixtures/escaping_reward.py"


def test_item_44_a_crafted_result_cannot_run_code_in_the_trainer(tmp_path):
    from alignment.errors import RewardError
    from reward.isolation import IsolatedReward

    marker = tmp_path / "escaped"
    with IsolatedReward(f"{ESCAPING}:crafted_result", timeout=20, memory_mb=1024) as iso:
        with pytest.raises(RewardError, match="not a number"):
            iso(["p"], ["x"], marker=[str(marker)])
    assert not marker.exists(), "the trainer unpickled the child's result and ran its __reduce__"


def test_item_44_the_timeout_kills_the_childs_own_children_too(tmp_path):
    from alignment.errors import RewardError
    from reward.isolation import IsolatedReward

    pid_file = tmp_path / "grandchild.pid"
    iso = IsolatedReward(f"{ESCAPING}:spawn_grandchild_then_hang", timeout=3, memory_mb=None)
    with pytest.raises(RewardError, match="timed out"):
        iso(["p"], ["x"], pid_file=[str(pid_file)])
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild), "a process the reward started survived the timeout kill"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_item_44_the_child_does_not_inherit_the_trainers_secrets(monkeypatch):
    from reward.isolation import IsolatedReward

    monkeypatch.setenv("R2_SECRET_TOKEN", "hf_abcdefghijklmnop")
    with IsolatedReward(f"{ESCAPING}:secret_length", timeout=20, memory_mb=1024) as iso:
        assert iso(["p"], ["x"]) == [0.0]  # neither os.environ nor /proc/self/environ holds it


# ----------------------------------------------------------------------------- 45 (issue item 11): redaction by value


def test_item_45_secrets_are_redacted_by_value_in_saved_recipes_errors_and_logs(monkeypatch, capsys, caplog):
    import logging

    from alignment import cli
    from alignment import recipe as recipes
    from alignment.errors import RecipeError

    env_secret, url_secret, header_secret = "sk-live-r2-0123456789", "urltok-r2-123456", "hdrtok-r2-987654321"
    monkeypatch.setenv("R2_RM_TOKEN", env_secret)
    reward = (f"[{{source: 'https://rm.example.org/score?token={url_secret}&model=x', token_env: R2_RM_TOKEN, "
              f"name: judge, kwargs: {{headers: {{Authorization: 'Bearer {header_secret}'}}}}}}]")
    recipe = recipes.load("recipes/tiny/ppo_rule.yaml", [f"reward={reward}"])
    for text in (recipe.resolved_yaml(), repr(recipe)):
        for secret in (env_secret, url_secret, header_secret):
            assert secret not in text, (secret, text)
    assert "model=x" in recipe.resolved_yaml()  # only the secret parts go

    def failing_run(args):  # an error that quotes the token's value (e.g. a server echoing it back)
        raise RecipeError(f"the reward server refused the token {env_secret}")

    monkeypatch.setattr(cli, "cmd_run", failing_run)
    assert cli.main(["run", "recipes/tiny/ppo_rule.yaml"]) == 2
    assert env_secret not in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        logging.getLogger("some.library").warning("retrying %s with Authorization: Bearer %s", "u", header_secret)
        logging.getLogger("some.library").warning("calling https://h/x?api_key=%s", url_secret)
        logging.getLogger("some.library").warning("token is %s", env_secret)
    assert not any(s in caplog.text for s in (env_secret, url_secret, header_secret)), caplog.text


def test_item_43_an_in_process_reward_without_a_timeout_gets_the_default_one(tmp_path, monkeypatch):
    import reward
    from alignment.errors import RewardError
    from reward import combine

    hang = tmp_path / "hang.py"
    hang.write_text("import time\ndef score(prompts, completions, **kw):\n    time.sleep(30)\n    return [1.0]\n")
    assert reward.build([f"{hang}:score"]).sources[0].timeout == combine.DEFAULT_TIMEOUT_S == 300.0
    monkeypatch.setattr(combine, "DEFAULT_TIMEOUT_S", 0.3)
    combined = reward.build([f"{hang}:score"])
    started = time.monotonic()
    with pytest.raises(RewardError, match="timed out after 0.3 s"):
        combined(["p"], ["x"])
    assert time.monotonic() - started < 5


def _tiny_ppo(temperature: float, eos_bias: float = 0.0):
    """The PPO tests' tiny policy; `eos_bias` raises the EOS logit so that responses end (a healthy run)."""
    import copy

    import torch

    from alignment.ppo import PPOConfig, PPOTrainer
    from tests.ppo.conftest import make_llama, make_seq_critic, make_tokenizer

    tokenizer = make_tokenizer()
    lm = make_llama(tokenizer)
    bias = torch.zeros(lm.lm_head.out_features)
    bias[tokenizer.eos_token_id] = eos_bias
    lm.lm_head.bias = torch.nn.Parameter(bias)
    config = PPOConfig(learning_rate=1e-3, batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8,
                       temperature=temperature, total_steps=2, seed=0)
    prompts = [{"prompt": f"{w} {w}"} for w in ("a", "b", "c", "d", "e", "f", "g", "h")]
    return PPOTrainer(config, lm, copy.deepcopy(lm), make_seq_critic(tokenizer), tokenizer,
                      lambda p, c, **k: [float(len(x)) for x in c], prompts)


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_item_43_rl_health_checks_are_on_by_default_silent_when_healthy_firing_when_collapsed():
    import warnings

    from alignment.stages.online_rl import Options

    assert Options().min_entropy is not None and Options().max_kl is not None and Options().min_eos_rate is not None
    _reset_accelerate()
    with warnings.catch_warnings(record=True) as caught:  # healthy: samples vary, responses end
        warnings.simplefilter("always")
        healthy = _tiny_ppo(temperature=1.0, eos_bias=2.0).step()
    assert healthy["objective/entropy"] > 0.5 and healthy["val/eos_rate"] > 0.2, healthy
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning) and "PPO step" in str(w.message)]
    _reset_accelerate()
    with pytest.warns(RuntimeWarning, match=r"objective/entropy = .* is below 0.01.*val/eos_rate = 0 is below"):
        collapsed = _tiny_ppo(temperature=1e-3, eos_bias=-20.0).step()  # one token every time, never stops
    assert collapsed["objective/entropy"] < 0.01 and collapsed["val/eos_rate"] == 0.0, collapsed
    _reset_accelerate()
