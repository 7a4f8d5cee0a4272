"""One metrics vocabulary (alignment/metrics.py): the same name, the same quantity, the same unit, in every stage."""

import inspect
import json
import math
from pathlib import Path

import pytest

from alignment import recipe as recipes
from alignment.metrics import VOCABULARY, MetricsLog, read_records, shared_rl_metrics

SHARED = ("kl/per_sequence", "kl/per_token", "response/tokens", "reward/total", "reward/answer_match",
          "entropy/per_token")


def test_ppo_record_translated_by_hand():
    # 2 responses, 3 and 5 tokens, KL sums 0.6 and 1.0: per sequence 0.8, per token 1.6 / 8 = 0.2
    record = {"objective/kl": 0.8, "val/response_length": 4.0, "objective/score": 0.25,
              "objective/entropy": 1.5, "reward/answer_match": 0.25}
    assert shared_rl_metrics(record) == {"kl/per_sequence": 0.8, "kl/per_token": pytest.approx(0.2),
                                         "response/tokens": 4.0, "reward/total": 0.25,
                                         "entropy/per_token": 1.5}


def test_trl_record_translated_by_hand():
    record = {"kl": 0.05, "completions/mean_length": 6.0, "reward": 0.5, "entropy": 2.0,
              "rewards/answer_match/mean": 0.5, "rewards/answer_match/std": 0.1, "loss": 0.01}
    assert shared_rl_metrics(record) == {"kl/per_token": 0.05, "kl/per_sequence": pytest.approx(0.3),
                                         "response/tokens": 6.0, "reward/total": 0.5, "entropy/per_token": 2.0,
                                         "reward/answer_match": 0.5}


def test_records_without_rl_keys_get_nothing():
    # a reward model's `reward`-like keys or an eval record must not be mistaken for RL metrics
    assert shared_rl_metrics({"loss": 0.3, "reward": 1.0, "eval/greedy_accuracy": 0.5}) == {}


def test_trl_logs_kl_as_the_mean_over_completion_tokens():
    """The translation kl/per_sequence = kl x completions/mean_length holds because trl's `kl` is the sum of
    the per-token KL over every completion token divided by their count; this fails if trl changes that."""
    from trl import GRPOTrainer, RLOOTrainer

    grpo = inspect.getsource(GRPOTrainer)
    assert '["kl"].append(global_masked_mean(per_token_kl))' in grpo
    assert "local_sum, local_count = (x * mask).sum(), mask.sum().float()" in grpo
    rloo = inspect.getsource(RLOOTrainer)
    assert "(per_token_kl * completion_mask).sum(), completion_mask.sum().float()" in rloo
    assert '["kl"].append((kl_stats[0] / kl_stats[1].clamp(min=1.0)).item())' in rloo


def test_metrics_log_is_the_one_writer(tmp_path):
    class Recorder:
        def __init__(self):
            self.records, self.closed = [], False

        def log(self, record):
            self.records.append(record)

        def close(self):
            self.closed = True

    trackers = Recorder()
    log = MetricsLog(tmp_path, trackers)
    log.write({"objective/kl": 1.2, "val/response_length": 3.0, "api_key": "sk-secret-123"}, step=1)
    log.write({"loss": 0.5}, step=2)
    log.trim(1)
    log.close()
    written = read_records(tmp_path)
    assert [r["step"] for r in written] == [1]
    assert written[0]["kl/per_token"] == pytest.approx(0.4) and written[0]["api_key"] == "***"
    assert [r["step"] for r in trackers.records] == [1, 2] and trackers.closed
    assert trackers.records[0] == written[0]  # the trackers get exactly the file's record


def test_no_other_module_writes_metrics_jsonl():
    root = Path(__file__).resolve().parents[2]
    writers = []
    for path in sorted((root / "alignment").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name != "metrics.py" and '"metrics.jsonl").open' in text:
            writers.append(str(path.relative_to(root)))
    assert writers == []


def test_docs_table_lists_every_shared_name():
    table = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text(encoding="utf-8")
    for metric in VOCABULARY:
        assert f"`{metric.name}`" in table, metric.name


# --------------------------------------------------------------------------- one step of each RL stage

PPO_ONE_STEP = ["model.name_or_path=tiny:1m", "data.max_samples=16", "eval=null", "train.total_steps=1",
                "train.batch_size=8", "train.mini_batch_size=8", "train.ppo_epochs=1", "train.max_new_tokens=4",
                "train.logging_steps=1",
                "train.missing_eos_penalty=null", "options.evaluate_before=false", "options.progress_bar=false",
                "options.save_steps=1",
                "reward=[{source: answer_match}]"]
TRL_ONE_STEP = ["model.name_or_path=tiny:1m", "data.max_samples=16", "eval=null", "train.max_steps=1",
                "train.per_device_train_batch_size=8", "train.num_generations=4", "train.max_completion_length=4",
                "train.logging_steps=1", "train.save_steps=1", "train.beta=0.1", "options.evaluate_before=false",
                "reward=[{source: answer_match}]"]


@pytest.fixture(scope="module")
def one_step_logs(tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    from alignment.stages import online_rl, ppo

    logs = {}
    for stage, recipe_path, overrides, run in (
            ("ppo", "recipes/tiny/ppo_rule.yaml", PPO_ONE_STEP, ppo.run),
            ("grpo", "recipes/tiny/grpo.yaml", TRL_ONE_STEP, online_rl.run),
            ("rloo", "recipes/tiny/rloo.yaml", TRL_ONE_STEP, online_rl.run)):
        out = tmp_path_factory.mktemp(stage)
        AcceleratorState._reset_state(True)  # gradient accumulation state is a process-wide singleton
        GradientState._reset_state()
        metrics = run(recipes.load(recipe_path, overrides + [f"output_dir={out}"]))
        step_records = [r for r in read_records(out) if "reward/total" in r]
        logs[stage] = (step_records, metrics)
        logs[f"{stage}_dir"] = out
    return logs


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
def test_one_step_logs_the_shared_keys_with_one_meaning(stage, one_step_logs):
    records, metrics = one_step_logs[stage]
    assert len(records) == 1, records
    record = records[0]
    for key in SHARED:
        assert key in record and math.isfinite(record[key]), (stage, key, record)
    # KL per token = KL per sequence / response tokens, on the same batch
    assert record["kl/per_token"] == pytest.approx(record["kl/per_sequence"] / record["response/tokens"], rel=1e-6)
    assert 1.0 <= record["response/tokens"] <= 4.0  # max_new_tokens / max_completion_length = 4
    assert record["reward/total"] == pytest.approx(record["reward/answer_match"])  # one source, weight 1
    # the run's summary reads the same names
    assert metrics["train_kl_per_token_last"] == pytest.approx(record["kl/per_token"])
    assert metrics["train_kl_per_sequence_last"] == pytest.approx(record["kl/per_sequence"])


def test_the_three_logs_share_one_key_set(one_step_logs):
    key_sets = {stage: set(one_step_logs[stage][0][0]) & set(SHARED) for stage in ("ppo", "grpo", "rloo")}
    assert all(keys == set(SHARED) for keys in key_sets.values()), key_sets


def test_a_broken_metrics_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        read_records(tmp_path)
    assert read_records(tmp_path / "missing") == []


def test_ppo_logs_sampled_completions_for_the_dashboard(one_step_logs):
    """options.log_completions (4) samples of each logged step, with the score the reward gave them."""
    lines = [json.loads(line) for line in (one_step_logs["ppo_dir"] / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {line["step"] for line in lines} == {1}
    assert all(isinstance(line["completion"], str) and line["reward"] in (0.0, 1.0) for line in lines), lines
    assert all("prompt" in line for line in lines)
