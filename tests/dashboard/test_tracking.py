"""alignment.tracking: report_to names, the missing-package error, and the records each tracker receives."""

import json
import os
import sys
import types

import numpy as np
import pytest

from alignment.errors import RecipeError
from alignment.tracking import Trackers, normalise_report_to, require_tracker_packages


def needs(module: str):
    """Skip without `module`, except under CI (which installs the tracking extra): there it must be there."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI installs it with pip install -e '.[tracking]'")
        pytest.skip(f"{module} is not installed (pip install -e '.[tracking]')")


def event_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as tensorboard's own reader sees the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.parametrize("value, names", [
    (None, []), ("none", []), ([], []), (["none"], []), ("tensorboard", ["tensorboard"]),
    ("TensorBoard", ["tensorboard"]), ("tensorboard,wandb", ["tensorboard", "wandb"]),
    (["mlflow", "trackio", "mlflow"], ["mlflow", "trackio"]),
])
def test_normalise_report_to(value, names):
    assert normalise_report_to(value) == names


def test_unknown_tracker_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbord'; did you mean 'tensorboard'\? "
                                         r"\(valid: tensorboard, wandb, mlflow, trackio, or none\)"):
        normalise_report_to(["tensorbord"])
    with pytest.raises(ValueError, match="not a tracker name"):
        normalise_report_to([3])


def test_a_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match=r"r.yaml: train.report_to: wandb needs the 'wandb' package, which is not "
                                          r"installed; install the trackers with pip install -e '.\[tracking\]'"):
        require_tracker_packages(["wandb"], where="r.yaml: train.report_to")
    with pytest.raises(RecipeError, match=r"\.\[tracking\]"):  # Trackers checks before it builds anything
        Trackers("wandb", "/nonexistent", {}, "run")
    require_tracker_packages("none")  # nothing asked, nothing needed


RECORDS = [
    {"step": 1, "time": 1733000000.5, "objective/kl": 0.0, "reward/total": 0.25, "loss": 2.5, "note": "text",
     "flag": True, "nested": {"a": 1}},
    {"step": 2, "time": 1733000001.5, "objective/kl": 0.0123, "reward/total": 0.5, "loss": 2.25,
     "eval/greedy_accuracy": 0.375},
    {"step": 3, "time": 1733000002.5, "objective/kl": 0.0456, "reward/total": 0.625, "loss": 2.0,
     "count": 7},
]


def expected_series(records):
    """What a tracker must hold: every numeric key but step and time, at the record's step."""
    series = {}
    for record in records:
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            series.setdefault(key, []).append((record["step"], float(value)))
    return series


def test_tensorboard_holds_every_record_under_its_metrics_jsonl_name(tmp_path):
    needs("tensorboard")
    config = {"stage": "ppo", "reward": [{"source": "https://user:hunter2@example.com/score"}],
              "train": {"api_key": "sk-secret", "learning_rate": 1e-3}}
    with Trackers("tensorboard", tmp_path, config, "ppo") as trackers:
        for record in RECORDS:
            trackers.log(record)
    seen = event_scalars(tmp_path / "tensorboard")
    want = expected_series(RECORDS)
    assert sorted(seen) == ["count", "eval/greedy_accuracy", "loss", "objective/kl", "reward/total"]
    for tag, points in want.items():
        assert [s for s, _ in seen[tag]] == [s for s, _ in points], tag
        # event files store a scalar as float32: equal to the JSON number to float32 precision
        assert [v for _, v in seen[tag]] == [float(np.float32(v)) for _, v in points], tag

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [e.wall_time for e in accumulator.Scalars("loss")] == [r["time"] for r in RECORDS]
    text = accumulator.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"learning_rate": 0.001' in text and "sk-secret" not in text and "hunter2" not in text


def test_tensorboard_resumed_run_drops_the_interrupted_runs_later_steps(tmp_path):
    needs("tensorboard")
    with Trackers(["tensorboard"], tmp_path, {}, "ppo") as first:
        for step in (1, 2, 3):  # killed after step 3; its checkpoint was step 2
            first.log({"step": step, "time": 1.0 + step, "loss": float(step)})
    with Trackers(["tensorboard"], tmp_path, {}, "ppo") as resumed:
        for step in (3, 4):
            resumed.log({"step": step, "time": 10.0 + step, "loss": 10.0 * step})
    assert event_scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_no_trackers_is_a_no_op(tmp_path):
    trackers = Trackers("none", tmp_path, {}, "run")
    assert not trackers
    trackers.log(RECORDS[0])
    trackers.close()
    assert list(tmp_path.iterdir()) == []


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, metrics, step=None):
        self.calls.append(("log", dict(metrics), step))

    def finish(self):
        self.calls.append(("finish",))


def fake_module(monkeypatch, name, **functions):
    module = types.ModuleType(name)
    module.__spec__ = types.SimpleNamespace(name=name)  # importlib.util.find_spec finds a module in sys.modules
    for key, value in functions.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_wandb_receives_the_records_and_the_redacted_config(tmp_path, monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls)

    fake_module(monkeypatch, "wandb", init=init)
    monkeypatch.setenv("WANDB_PROJECT", "demo")
    with Trackers("wandb", tmp_path, {"train": {"token": "abc123"}, "seed": 3}, "sft") as trackers:
        for record in RECORDS:
            trackers.log(record)
    assert calls[0] == ("init", {"project": "demo", "name": "sft", "dir": str(tmp_path),
                                 "config": {"train": {"token": "***"}, "seed": 3}})
    assert calls[1] == ("log", {"objective/kl": 0.0, "reward/total": 0.25, "loss": 2.5}, 1)
    assert calls[3] == ("log", {"objective/kl": 0.0456, "reward/total": 0.625, "loss": 2.0, "count": 7.0}, 3)
    assert calls[-1] == ("finish",)


def test_mlflow_receives_the_records_with_their_wall_time(tmp_path, monkeypatch):
    calls = []
    fake_module(monkeypatch, "mlflow", set_experiment=lambda name: calls.append(("experiment", name)),
                start_run=lambda run_name: calls.append(("start", run_name)),
                log_params=lambda params: calls.append(("params", params)),
                log_dict=lambda data, name: calls.append(("dict", name)),
                log_metrics=lambda metrics, step, timestamp: calls.append(("metrics", metrics, step, timestamp)),
                end_run=lambda: calls.append(("end",)))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    with Trackers("mlflow", tmp_path, {"train": {"learning_rate": 0.001}, "stage": "ppo"}, "ppo") as trackers:
        trackers.log(RECORDS[1])
    assert calls[:4] == [("experiment", "alignment"), ("start", "ppo"),
                         ("params", {"train.learning_rate": "0.001", "stage": "ppo"}), ("dict", "recipe.json")]
    assert calls[4] == ("metrics", {"objective/kl": 0.0123, "reward/total": 0.5, "loss": 2.25,
                                    "eval/greedy_accuracy": 0.375}, 2, 1733000001500)
    assert calls[-1] == ("end",)


def test_trackio_receives_the_records(tmp_path, monkeypatch):
    calls = []
    fake_module(monkeypatch, "trackio", init=lambda **kw: calls.append(("init", kw)),
                log=lambda metrics, step: calls.append(("log", metrics, step)),
                finish=lambda: calls.append(("finish",)))
    with Trackers("trackio", tmp_path, {"seed": 1}, "dpo") as trackers:
        trackers.log(RECORDS[2])
    assert calls == [("init", {"project": "alignment", "name": "dpo", "config": {"seed": 1}}),
                     ("log", {"objective/kl": 0.0456, "reward/total": 0.625, "loss": 2.0, "count": 7.0}, 3),
                     ("finish",)]


def test_wandb_offline_writes_the_run_to_disk(tmp_path, monkeypatch):
    """The real package, offline (only where it is installed: the tracking extra, not CI's default)."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install -e '.[tracking]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Trackers("wandb", tmp_path, {"seed": 1}, "ppo") as trackers:
        for record in RECORDS:
            trackers.log(record)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    # the offline run file (wandb's protobuf records, what `wandb sync` uploads) holds each metric's name and
    # value, and nothing that is not a metric
    data = next(runs[0].glob("*.wandb")).read_bytes()
    for piece in (b"reward/total", b"eval/greedy_accuracy", b"0.625", b"2.25", b"0.0456"):
        assert piece in data, piece
    assert b"note" not in data and b"nested" not in data


def test_mlflow_local_store_holds_the_records(tmp_path, monkeypatch):
    """The real package on a local SQLite store (only where it is installed: the tracking extra)."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (pip install -e '.[tracking]')")
    monkeypatch.chdir(tmp_path)  # mlflow puts a SQLite store's artifacts (recipe.json) under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dashboard-test")
    with Trackers("mlflow", tmp_path, {"train": {"learning_rate": 0.001}, "token": "abc"}, "ppo") as trackers:
        for record in RECORDS:
            trackers.log(record)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("dashboard-test").experiment_id])
    assert run.info.run_name == "ppo" and run.data.params["train.learning_rate"] == "0.001"
    assert run.data.params["token"] == "***"
    for key, points in expected_series(RECORDS).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == points, key


def test_trackio_local_store_holds_the_records(tmp_path, monkeypatch):
    """The real package on its local store (only where it is installed: the tracking extra)."""
    import importlib.util

    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed (pip install -e '.[tracking]')")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "dashboard-test")
    with Trackers("trackio", tmp_path, {"seed": 1}, "ppo") as trackers:
        for record in RECORDS:
            trackers.log(record)
    import sqlite3

    # trackio's local store: one SQLite file per project, a row per logged step with its metrics as JSON
    with sqlite3.connect(tmp_path / "trackio" / "dashboard-test.db") as store:
        rows = store.execute("SELECT step, metrics FROM metrics ORDER BY step").fetchall()
    assert [(step, json.loads(metrics)) for step, metrics in rows] == [
        (record["step"], {k: v for k, v in record.items() if k in expected_series(RECORDS)}) for record in RECORDS]
