"""The seed study's bookkeeping: reading a pipeline's report, the spread, the claims, the table."""

import json

from benchmarks import efficacy


def write_seed(root, sft, control, dpo, ppo, rm, seconds=100.0):
    (root / "eval").mkdir(parents=True)
    checkpoints = {
        "sft": {"metrics": {"greedy_accuracy": sft, "sampled_accuracy": sft - 0.02, "kl_to_reference": {"k1": 0.0}}},
        "sft_control": {"metrics": {"greedy_accuracy": control, "sampled_accuracy": control}},
        "dpo": {"metrics": {"greedy_accuracy": dpo, "sampled_accuracy": dpo, "kl_to_reference": {"k1": 0.5}}},
        "ppo": {"metrics": {"greedy_accuracy": ppo, "sampled_accuracy": ppo, "kl_to_reference": {"k1": 0.4}}},
        "reward_model": {"metrics": {"preference_accuracy": rm}},
    }
    (root / "eval" / "report.json").write_text(json.dumps({"checkpoints": checkpoints}))
    (root / "sft").mkdir()
    (root / "sft" / "metrics.json").write_text(json.dumps({"train_seconds": seconds}))


def test_seed_row_reads_every_checkpoint_metric_and_stage_time(tmp_path):
    write_seed(tmp_path, sft=0.55, control=0.58, dpo=0.9, ppo=0.8, rm=0.88, seconds=123.0)
    row = efficacy.seed_row(tmp_path)
    assert row[("sft", "greedy_accuracy")] == 0.55 and row[("sft", "sampled_accuracy")] == 0.53
    assert row[("dpo", "kl_to_reference")] == 0.5  # the k1 estimate of the nested KL entry
    assert row[("reward_model", "preference_accuracy")] == 0.88
    assert row[("sft", "seconds")] == 123.0


def test_claims_must_hold_on_every_seed(tmp_path):
    rows = {}
    for seed, (sft, control, dpo, ppo, rm) in enumerate([(0.55, 0.58, 0.90, 0.80, 0.88),
                                                          (0.50, 0.52, 0.64, 0.61, 0.86),
                                                          (0.40, 0.45, 0.90, 0.56, 0.84)]):
        write_seed(tmp_path / str(seed), sft, control, dpo, ppo, rm)
        rows[seed] = efficacy.seed_row(tmp_path / str(seed))
    claims = {c["claim"]: c for c in efficacy.check_claims(rows)}
    assert claims["SFT >= 45% greedy"]["holds_on"] == 2  # seed 2 is at 40%
    assert claims["reward model >= 85% held-out pair accuracy"]["holds_on"] == 2
    dpo_control = claims["DPO >= SFT control + 5 points greedy"]
    assert dpo_control["holds_on"] == 3
    assert abs(dpo_control["per_seed"][1] - 0.12) < 1e-12  # 0.64 - 0.52
    ppo_sft = claims["PPO >= SFT + 10 points greedy"]
    assert ppo_sft["holds_on"] == 3  # 25, 11 and 16 points
    ppo_control = claims["PPO >= SFT control + 5 points greedy"]
    assert ppo_control["holds_on"] == 3  # 22, 9 and 11 points


def test_spread_is_min_median_max():
    assert efficacy.spread([0.3, 0.9, 0.5, 0.4]) == {"min": 0.3, "median": 0.45, "max": 0.9, "n": 4}


def test_markdown_table_names_the_cpu_and_prints_min_median_max(tmp_path):
    write_seed(tmp_path / "a", 0.55, 0.58, 0.90, 0.80, 0.88)
    row = {f"{n}/{m}": v for (n, m), v in efficacy.seed_row(tmp_path / "a").items()}
    report = {
        "pipeline": "recipes/tiny/pipeline.yaml", "date": "2026-12-01 19:00",
        "kernel_path": {"cpu": "Test CPU", "cpu_flags": ["avx2"], "aten_capability": "AVX2", "threads": 2,
                        "forced": {}},
        "versions": {"torch": "2.13.0"},
        "runs": [{"seed": 0, "status": "ok", "seconds": 300.0, "row": row}],
        "summary": {key: efficacy.spread([value]) for key, value in row.items()},
        "claims": efficacy.check_claims({0: efficacy.seed_row(tmp_path / "a")}),
        "pipeline_seconds": efficacy.spread([300.0]),
    }
    text = efficacy.markdown(report)
    assert "Test CPU" in text and "AVX2" in text and "torch 2.13.0" in text
    assert "| **median** | 300 | 55.0 |" in text
    assert "| SFT >= 45% greedy | 1 of 1 | +55.0 |" in text


def test_health_extremes_are_the_worst_value_over_training(tmp_path):
    write_seed(tmp_path, 0.55, 0.58, 0.90, 0.80, 0.88)
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "metrics.json").write_text(json.dumps({"train_seconds": 40.0}))
    lines = [{"step": 1, "objective/kl": 0.0, "objective/entropy": 0.31, "val/eos_rate": 1.0},
             {"step": 2, "objective/kl": 1.01, "objective/entropy": 0.12, "val/eos_rate": 0.97},
             {"step": 2, "eval/greedy_accuracy": 0.9}]  # an eval line has none of the signals
    (ppo / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    row = efficacy.seed_row(tmp_path)
    assert row[("ppo", "train_kl_max")] == 1.01
    assert row[("ppo", "train_entropy_min")] == 0.12
    assert row[("ppo", "train_eos_rate_min")] == 0.97
    assert ("sft", "train_kl_max") not in row  # sft wrote no metrics.jsonl here
