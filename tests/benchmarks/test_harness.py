"""Smoke tests of the benchmark harness plumbing (tiny step counts; no timing assertions).

The harness tests replace the child processes with a fake that writes a
result file, so they check the alternation, aggregation and report writing in
milliseconds; one test runs the real SFT workload (ours and the peer, one
step each, in this process) to check the recipe overrides, the timing hook and
the token count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import harness, measure, workloads
from benchmarks.__main__ import main as cli_main


def _arg(cmd, name):
    return cmd[cmd.index(name) + 1]


@pytest.fixture
def fake_children(monkeypatch, tmp_path):
    """Children that 'run' instantly: ours at 100 tokens/s, the peer at 80; PPO's peer venv is faked too."""
    calls = []

    def run_child(cmd, log_path, timeout):
        calls.append(cmd)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("fake\n")
        module = cmd[2]
        if module == "benchmarks.worker":
            stage, side = _arg(cmd, "--stage"), _arg(cmd, "--side")
        else:
            stage, side = "ppo", "peer"
        if stage == "reward_model" and side == "ours":
            result = {"status": "pending", "error": "stage 'reward_model' cannot be loaded"}
        else:
            speed = 100.0 if side == "ours" else 80.0
            result = {"status": "ok", "train_seconds": 1.0, "train_tokens": int(speed), "samples": 4,
                      "tokens_per_s": speed, "samples_per_s": speed / 25, "peak_rss_mb": 500.0 + speed,
                      "matmul_params": 1000, "metric_name": "loss", "metric": 1.5, "steps": 2, "settings": {}}
        measure.write_result(_arg(cmd, "--result"), result)
        return 0, 0.01

    monkeypatch.setattr(harness, "run_child", run_child)
    monkeypatch.setattr(harness, "measure_ceiling",
                        lambda workdir, trials, log: {"cpu_fp32": {"best_gflops": 1.0, "trials_gflops": [1.0]}})

    def prepare_assets(preset, workdir, log):
        path = Path(workdir) / f"assets-{preset}.json"
        path.write_text(json.dumps({"preset": preset, "policy": "p", "reward": "r", "parameters": 1,
                                    "matmul_parameters": 1}))
        return path

    monkeypatch.setattr(harness, "prepare_assets", prepare_assets)
    from benchmarks import peer_env

    monkeypatch.setattr(peer_env, "ensure", lambda log=print: Path(sys.executable))
    return calls


def test_runs_alternate_ours_and_peer_and_write_reports(fake_children, tmp_path):
    plan = harness.Plan(stages=["sft", "ppo"], presets=["1m"], repeats=2, steps=2, output=str(tmp_path / "out"))
    report = harness.run(plan, log=lambda *a: None)
    order = [(r["stage"], r["side"], r["repeat"]) for r in report["runs"]]
    assert order == [("sft", "ours", 0), ("sft", "peer", 0), ("sft", "ours", 1), ("sft", "peer", 1),
                     ("ppo", "ours", 0), ("ppo", "peer", 0), ("ppo", "ours", 1), ("ppo", "peer", 1)]
    assert any(cmd[2] == "benchmarks.ppo_peer" for cmd in fake_children)  # PPO's peer: its own entry point
    row = report["summary"][0]
    assert row["ratio"]["tokens_per_s"]["median"] == pytest.approx(1.25)
    assert row["sides"]["ours"]["mfu"]["median"] == pytest.approx(6 * 1000 * 100 / 1e9)
    written = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert written["mfu_formula"].startswith("MFU = 6 x matmul_params")
    table = (tmp_path / "out" / "latest.md").read_text()
    assert "| sft | 1m | **ours/peer** | **1.25** |" in table


def test_pending_stage_is_reported_not_repeated(fake_children, tmp_path):
    plan = harness.Plan(stages=["reward_model"], presets=["1m"], repeats=3, steps=1, output=str(tmp_path))
    report = harness.run(plan, log=lambda *a: None)
    assert [(r["side"], r["status"]) for r in report["runs"]] == [("ours", "pending"), ("peer", "ok")]
    assert "pending: stage 'reward_model' cannot be loaded" in report["table"]


def test_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        harness.run(harness.Plan(stages=["sfx"], presets=["1m"], output=str(tmp_path)), log=lambda *a: None)
    with pytest.raises(SystemExit):
        cli_main(["run", "--stage", "sfx", "--output", str(tmp_path)])


def test_spread_and_paired_ratio():
    runs = [
        {"stage": "dpo", "preset": "1m", "side": side, "repeat": i, "status": "ok", "tokens_per_s": t,
         "samples_per_s": t, "peak_rss_mb": 1.0, "metric": 0.5, "mfu": None}
        for i, (a, b) in enumerate([(10, 5), (30, 10), (20, 20)]) for side, t in (("ours", a), ("peer", b))
    ]
    row = harness.summarise_runs(runs)[0]
    assert row["sides"]["ours"]["tokens_per_s"] == {"median": 20, "min": 10, "max": 30, "n": 3}
    assert row["ratio"]["tokens_per_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_ceiling_measures_something():
    from benchmarks.ceiling import matmul_gflops

    result = matmul_gflops(n=64, repeats=1, trials=2)
    assert result["best_gflops"] > 0 and len(result["trials_gflops"]) == 2


def test_ceiling_is_the_fastest_shape(monkeypatch):
    from benchmarks import ceiling

    rates = {(8, 8, 8): 10.0, (16, 16, 4): 30.0, (16, 4, 16): 20.0}
    monkeypatch.setattr(ceiling, "matmul_gflops", lambda repeats, trials, dtype, shape: {
        "shape": list(shape), "best_gflops": rates[shape], "trials_gflops": [rates[shape]]})
    best = ceiling.best_over_shapes(tuple(rates), repeats=1, trials=1)
    assert best["best_gflops"] == 30.0 and best["shape"] == [16, 16, 4]
    assert best["shapes_gflops"] == {"8x8x8": 10.0, "16x16x4": 30.0, "16x4x16": 20.0}


def test_token_counter_counts_non_pad_tokens_with_grad_only():
    import torch

    counter = measure.TokenCounter(pad_token_id=0)
    counter.active = True
    ids = torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]])
    counter._hook(None, (), {"input_ids": ids, "attention_mask": (ids != 0).long()})
    assert counter.tokens == 4
    counter._hook(None, (ids,), {})  # padding-free style: no mask, pad tokens excluded
    assert counter.tokens == 8
    with torch.no_grad():
        counter._hook(None, (), {"input_ids": ids, "attention_mask": (ids != 0).long()})
    assert counter.tokens == 8


def test_real_sft_workload_one_step(tmp_path):
    """Ours (recipe + stage) and the peer (plain trl) run one step on identical weights and the same data."""
    from benchmarks.assets import build

    assets = build("1m", tmp_path / "assets")
    results = {}
    try:
        for side in ("ours", "peer"):
            spec = workloads.Spec(stage="sft", side=side, assets=assets, steps=1, workdir=str(tmp_path / side),
                                  batch=4, logging_steps=1, max_samples=16)
            results[side] = workloads.run(spec)
            measure.uninstrument_trainers()
    finally:
        measure.uninstrument_trainers()
    for side, result in results.items():
        assert result["steps"] == 1 and result["samples"] == 4, side
        assert result["train_tokens"] > 4 and result["train_seconds"] > 0, side
        assert result["settings"]["bf16"] is False and result["settings"]["gradient_checkpointing"] is False
    assert results["ours"]["train_tokens"] == results["peer"]["train_tokens"]  # same rows, same batch
    assert results["ours"]["metric"] == pytest.approx(results["peer"]["metric"], rel=1e-5)  # same weights


def test_table_merges_reports_later_rows_win(fake_children, tmp_path, capsys):
    first = harness.run(harness.Plan(stages=["sft", "dpo"], presets=["1m"], repeats=1, steps=1,
                                     output=str(tmp_path / "a")), log=lambda *a: None)
    second = harness.run(harness.Plan(stages=["reward_model"], presets=["1m"], repeats=1, steps=1,
                                      output=str(tmp_path / "b")), log=lambda *a: None)
    assert first["summary"] and second["summary"]
    assert cli_main(["table", str(tmp_path / "a" / "latest.json"), str(tmp_path / "b" / "latest.json")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    stages = [line.split("|")[1].strip() for line in lines[2:]]
    assert stages[0] == "sft" and "reward_model" in stages and stages[-1] == "dpo"  # stage order kept
