"""benchmarks/precision_gain.py: reading a run, the ratio table, and (slow) one real pair."""

import json

import pytest

from benchmarks import precision_gain


def _run_dir(tmp_path, name, chosen, samples_per_s, loss):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "run_info.json").write_text(json.dumps({"precision": {
        "requested": "auto", "chosen": chosen, "device": "cpu", "reason": "auto: test", "parameters": 19_000_000}}))
    (folder / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "time": 100.0, "data/rows": 10}) + "\n"
        + json.dumps({"step": 10, "time": 103.0, "loss": 3.0}) + "\n"
        + json.dumps({"step": 40, "time": 111.0, "loss": 2.6}) + "\n"
        + json.dumps({"step": 40, "time": 111.0, "train_samples_per_second": samples_per_s, "train_loss": loss,
                      "train_runtime": 12.5}) + "\n")
    return folder


def test_read_run_takes_the_choice_the_trainer_summary_and_the_steady_rate(tmp_path):
    got = precision_gain.read_run(_run_dir(tmp_path, "a", "bf16", 204.8, 2.556))
    # samples per step 204.8 x 12.5 s / 40 steps = 64; steady: 30 steps x 64 / (111 - 103) s = 240
    assert got == {"chosen": "bf16", "reason": "auto: test", "parameters": 19_000_000, "samples_per_s": 204.8,
                   "steady_samples_per_s": 240.0, "train_loss": 2.556, "train_runtime_s": 12.5}


def test_read_run_without_a_summary_names_the_file(tmp_path):
    folder = _run_dir(tmp_path, "a", "bf16", 1.0, 1.0)
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        precision_gain.read_run(folder)


def test_summary_ratios_median_and_target():
    pairs = [{"auto": {"status": "ok", "chosen": "bf16", "samples_per_s": a},
              "fp32": {"status": "ok", "samples_per_s": f}} for a, f in ((131.9, 77.6), (118.4, 84.2), (132.9, 71.4))]
    for pair, (a, f) in zip(pairs, ((132.8, 80.0), (139.1, 67.0), (120.0, 60.0))):
        pair["auto"]["steady_samples_per_s"], pair["fp32"]["steady_samples_per_s"] = a, f
    summary = precision_gain.summarise(pairs, target=2.0)
    # 131.9 / 77.6 = 1.69974, 118.4 / 84.2 = 1.40618, 132.9 / 71.4 = 1.86134
    assert summary["ratios"] == [1.6997, 1.4062, 1.8613]
    assert summary["ratio"] == {"min": 1.4062, "median": 1.6997, "max": 1.8613}
    # steady: 132.8 / 80 = 1.66, 139.1 / 67 = 2.07612, 120 / 60 = 2
    assert summary["steady_ratio"] == {"min": 1.66, "median": 2.0, "max": 2.0761}
    assert summary["auto_chose"] == ["bf16"] and summary["target_met"] is False
    assert summary["steady_target_met"] is True
    assert precision_gain.summarise(pairs, target=1.5)["target_met"] is True


def test_failed_run_is_left_out_of_the_ratios_and_shown():
    pairs = [{"auto": {"status": "exit 1"}, "fp32": {"status": "ok", "samples_per_s": 10.0}},
             {"auto": {"status": "ok", "chosen": "fp32", "samples_per_s": 10.0, "train_loss": 1.0, "reason": "r"},
              "fp32": {"status": "ok", "samples_per_s": 8.0, "train_loss": 1.0}}]
    summary = precision_gain.summarise(pairs, target=None)
    assert summary["ratios"] == [1.25] and "target" not in summary
    assert "target" not in precision_gain.summarise(pairs, target=2.0)  # auto chose fp32: no speed promised
    report = {"time": "t", "command": "c", "commit": "x", "load_start": [0], "load_end": [0], "pairs": pairs,
              "summary": summary, "cpu": {"cpu": "cpu", "cpu_flags": [], "aten_capability": "AVX2", "forced": {},
                                          "threads": 2}}
    table = precision_gain.markdown(report)
    assert "| 0 | exit 1 |" in table and "| 1 | fp32 | 10.00 | 8.00 | 1.25x | - | - |" in table


@pytest.mark.slow
def test_one_real_pair_on_the_demo_model(tmp_path):
    # the ~1M demo model: auto keeps it at fp32 (under the size threshold) on any CPU, so both runs compute alike
    report = precision_gain.run_gain("recipes/tiny/sft.yaml", "tiny:1m", pairs=1, steps=2, isa="default",
                                     output=str(tmp_path), target=2.0, log=lambda *a: None)
    pair = report["pairs"][0]
    assert pair["auto"]["status"] == "ok" and pair["fp32"]["status"] == "ok"
    assert pair["auto"]["chosen"] == "fp32" and pair["auto"]["reason"]
    assert pair["auto"]["samples_per_s"] > 0 and len(list(tmp_path.glob("precision-gain-*.md"))) == 1
    assert pair["auto"]["steady_samples_per_s"] is None  # 2 steps: no two logged steps to time between
