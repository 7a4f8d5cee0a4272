"""The seed study's bookkeeping: reading a pipeline's report, the spread, the claims, the table."""

import json
import time

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


def write_tools_seed(root, sft, on, off, carry_calls_before, carry_calls_after):
    (root / "eval").mkdir(parents=True)

    def entry(accuracy, carry_calls):
        return {"metrics": {"greedy_accuracy": accuracy, "greedy/env/malformed_call_rate": 0.0,
                            "by_carry": {"true": {"greedy_accuracy": accuracy,
                                                  "greedy/env/tool_call_rate": carry_calls},
                                         "false": {"greedy/env/tool_call_rate": carry_calls / 2}},
                            "environment": "examples/envs/calculator.py:Calculator"}}

    checkpoints = {"sft_tools": entry(sft, carry_calls_before), "ppo_tools": entry(on, carry_calls_after),
                   "ppo_tools_off": entry(off, 0.0)}
    (root / "eval" / "report.json").write_text(json.dumps({"checkpoints": checkpoints}))
    (root / "ppo_tools").mkdir()
    (root / "ppo_tools" / "metrics.json").write_text(json.dumps({"train_seconds": 60.0}))
    lines = [{"step": 1, "env/malformed_call_rate": 0.03}, {"step": 2, "env/malformed_call_rate": 0.12}]
    (root / "ppo_tools" / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_tools_study_flattens_the_carry_split_and_checks_its_claims(tmp_path):
    rows = {}
    for seed, values in enumerate([(0.006, 0.988, 0.014, 0.0, 1.0),    # holds
                                   (0.272, 0.580, 0.624, 0.0, 0.0),    # PPO answered directly: fails two claims
                                   (0.002, 0.986, 0.002, 0.05, 1.0)]):
        write_tools_seed(tmp_path / str(seed), *values)
        rows[seed] = efficacy.seed_row(tmp_path / str(seed))
    assert rows[0][("ppo_tools", "by_carry/true/greedy/env/tool_call_rate")] == 1.0
    assert rows[0][("ppo_tools", "by_carry/false/greedy/env/tool_call_rate")] == 0.5
    assert ("ppo_tools", "environment") not in rows[0]  # text is not a number
    assert rows[0][("ppo_tools", "train_malformed_call_rate_max")] == 0.12
    claims = {c["claim"]: c for c in efficacy.check_claims(rows, efficacy.STUDIES["tools"].claims)}
    over_sft = claims["PPO + calculator >= SFT + 15 points greedy"]
    assert over_sft["holds_on"] == 3  # 98.2, 30.8 and 98.4 points
    over_control = claims["PPO + calculator >= PPO without tool results + 5 points greedy"]
    assert over_control["holds_on"] == 2 and abs(over_control["per_seed"][1] - (0.580 - 0.624)) < 1e-12
    calls = claims["greedy tool-call rate on carry problems rises >= 10 points"]
    assert calls["holds_on"] == 2 and calls["per_seed"][1] == 0.0


def test_tools_study_table_has_its_own_columns(tmp_path):
    write_tools_seed(tmp_path / "a", 0.006, 0.988, 0.014, 0.0, 1.0)
    raw = efficacy.seed_row(tmp_path / "a")
    row = {f"{n}/{m}": v for (n, m), v in raw.items()}
    report = {
        "study": "tools", "jobs": 2, "pipeline": "recipes/tiny/pipeline_tools.yaml", "date": "2026-12-06 20:00",
        "kernel_path": {"cpu": "Test CPU", "cpu_flags": ["avx2"], "aten_capability": "AVX2", "threads": 1,
                        "forced": {}},
        "versions": {"torch": "2.13.0"},
        "runs": [{"seed": 0, "status": "ok", "seconds": 900.0, "row": row}],
        "summary": {key: efficacy.spread([value]) for key, value in row.items()},
        "claims": efficacy.check_claims({0: raw}, efficacy.STUDIES["tools"].claims),
        "pipeline_seconds": efficacy.spread([900.0]),
    }
    text = efficacy.markdown(report)
    assert "| seed | pipeline s | sft_tools greedy | ppo_tools greedy | ppo_tools_off greedy | sft_tools carry tool call" in text
    assert "| **median** | 900 | 0.6 | 98.8 | 1.4 | 0.0 | 100.0 |" in text
    assert "2 seeds at a time" in text
    assert "| PPO + calculator >= SFT + 15 points greedy | 1 of 1 | +98.2 |" in text


def test_run_study_runs_seeds_side_by_side_with_a_share_of_the_cores(tmp_path, monkeypatch):
    import threading

    seen, overrides_seen, active, peak = [], [], [0], [0]
    lock = threading.Lock()

    def fake_run_seed(pipeline, seed, root, env, log_path, timeout, overrides=()):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        write_tools_seed(root, 0.006, 0.988, 0.014, 0.0, 1.0)
        seen.append((seed, pipeline, env.get("OMP_NUM_THREADS"), timeout))
        overrides_seen.append(tuple(overrides))
        with lock:
            active[0] -= 1
        return {"seed": seed, "status": "ok", "seconds": 1.0, "row": efficacy.seed_row(root), "log": str(log_path)}

    monkeypatch.setattr(efficacy, "run_seed", fake_run_seed)
    monkeypatch.setattr(efficacy, "kernel_path", lambda env, forced: {"cpu": "Test CPU", "cpu_flags": [],
                                                                      "aten_capability": "AVX2", "threads": 1,
                                                                      "forced": forced})
    monkeypatch.setattr(efficacy.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    report = efficacy.run_study([0, 1, 2], study="tools", jobs=2, workdir=str(tmp_path / "w"),
                                output=str(tmp_path / "out"), precision="bf16")
    assert peak[0] == 2  # two seeds at once, never three
    assert sorted(s for s, *_ in seen) == [0, 1, 2]
    assert {p for _, p, _, _ in seen} == {"recipes/tiny/pipeline_tools.yaml"}
    assert {threads for _, _, threads, _ in seen} == {"1"}  # 2 cores / 2 jobs
    assert {timeout for *_, timeout in seen} == {None}  # the tool study promises no wall time
    assert set(overrides_seen) == {("precision=bf16",)}  # every stage of every seed's pipeline
    assert efficacy.all_claims_hold(report)
    assert len(list((tmp_path / "out").glob("efficacy-*-tools-default-bf16.md"))) == 1


def test_rebuild_rereads_the_runs_with_todays_columns(tmp_path):
    # a study tabulated with fewer columns than the study has today; its evals were then re-run with more metrics
    work = tmp_path / "runs" / "20261206-195009-tools-default"
    write_tools_seed(work / "seed-0", 0.006, 0.988, 0.014, 0.0, 1.0)
    report_path = work / "seed-0" / "eval" / "report.json"
    report = json.loads(report_path.read_text())
    report["checkpoints"]["sft_tools"]["metrics"]["sampled/env/tool_call_rate"] = 0.21
    report_path.write_text(json.dumps(report))
    old = {
        "study": "tools", "jobs": 2, "pipeline": "recipes/tiny/pipeline_tools.yaml", "date": "2026-12-06 20:00",
        "kernel_path": {"cpu": "Test CPU", "cpu_flags": ["avx2"], "aten_capability": "AVX2", "threads": 1,
                        "forced": {}},
        "versions": {"torch": "2.13.0"}, "commit": "abc", "columns": [["sft_tools", "greedy_accuracy"]],
        "runs": [{"seed": 0, "status": "ok", "seconds": 900.0, "row": {}}],
        "summary": {}, "claims": [], "pipeline_seconds": efficacy.spread([900.0]), "within_time_limit": True,
    }
    out = tmp_path / "out"
    out.mkdir()
    (out / f"efficacy-{work.name}.json").write_text(json.dumps(old))
    rebuilt = efficacy.rebuild(work, output=str(out))
    assert rebuilt["columns"] == [list(c) for c in efficacy.STUDIES["tools"].columns]
    assert rebuilt["summary"]["sft_tools/sampled/env/tool_call_rate"]["median"] == 0.21
    assert rebuilt["runs"][0]["row"]["ppo_tools/greedy_accuracy"] == 0.988
    assert efficacy.all_claims_hold(rebuilt)
    text = (out / f"efficacy-{work.name}.md").read_text()
    assert "sft_tools sampled tool_call_rate" in text or "sampled tool" in text
    assert "commit abc; re-tabulated" in text
