"""The dashboard's API on hand-made run directories: states, records, reports, the token, the host check."""

import json
import os
import platform

import pytest

from alignment.dashboard import runs

pytest.importorskip("httpx")  # fastapi's TestClient


def client(root, **kwargs):
    from fastapi.testclient import TestClient

    from alignment.dashboard.app import create_app

    return TestClient(create_app(root, **kwargs), base_url="http://127.0.0.1:8050")


def make_run(folder, *, complete=False, checkpoint=False, records=(), stage="ppo"):
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(f"stage: {stage}\nmodel:\n  name_or_path: tiny:1m\ntrain:\n  total_steps: 10\n")
    with (folder / "metrics.jsonl").open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.write('{"step": 9, "obj')  # the half-written line of a run being killed mid-write
    if checkpoint:
        (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        (folder / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
        (folder / "checkpoints" / "checkpoint-4").mkdir()  # half-written: no trainer_state.json
    if complete:
        (folder / "run_info.json").write_text(json.dumps({"complete": True, "finished_at": "2026-12-01T20:00:00"}))
    return folder


RECORDS = [{"step": 1, "time": 1.0, "objective/kl": 0.0, "objective/score": 0.25},
           {"step": 2, "time": 2.0, "objective/kl": 0.02, "objective/score": 0.5}]


@pytest.fixture
def root(tmp_path):
    make_run(tmp_path / "pipe" / "sft", complete=True, records=RECORDS, stage="sft")
    make_run(tmp_path / "pipe" / "ppo", checkpoint=True, records=RECORDS)
    (tmp_path / "pipe" / "pipeline_state.json").write_text(json.dumps(
        {"sft": {"fingerprint": "a", "status": "done"}, "ppo": {"fingerprint": "b", "status": "interrupted"}}))
    make_run(tmp_path / "alone" / "crashed", records=RECORDS[:1])
    live = make_run(tmp_path / "alone" / "live", records=RECORDS)
    from alignment.checkpoint import lock_run_dir, unlock_run_dir

    lock_run_dir(live)  # held as a training stage holds it
    report = tmp_path / "pipe" / "eval"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"title": "Evaluation of sft, ppo", "baseline": "sft", "checkpoints": {
        "sft": {"path": "pipe/sft", "metrics": {"greedy_accuracy": 0.5},
                "samples": [{"prompt": "1+1?", "completion": "2", "correct": True},
                            {"prompt": "2+2?", "completion": "<b>5</b>", "correct": False}]},
        "ppo": {"path": "pipe/ppo", "metrics": {"greedy_accuracy": 1.0},
                "samples": [{"prompt": "1+1?", "completion": "2", "correct": True},
                            {"prompt": "2+2?", "completion": "4", "correct": True}]}}}))
    yield tmp_path
    unlock_run_dir(live)


def test_states_of_every_kind_of_run(root):
    found = runs.scan(root)
    states = {run["path"]: (run["state"], run["detail"]) for run in found["runs"]}
    assert states["pipe/sft"] == ("finished", "finished 2026-12-01T20:00:00")
    assert states["pipe/ppo"] == ("resumable", "interrupted by a signal; resumable from checkpoint-2 (run the "
                                               "pipeline again)")
    assert states["alone/crashed"][0] == "failed" and "nothing to resume" in states["alone/crashed"][1]
    assert states["alone/live"][0] == "running"
    assert set(states) == {"pipe/sft", "pipe/ppo", "alone/crashed", "alone/live"}  # checkpoints are no runs
    (pipeline,) = found["pipelines"]
    assert pipeline["path"] == "pipe" and pipeline["state"] == "resumable" and pipeline["reports"] == ["pipe/eval"]
    assert [(s["name"], s["state"]) for s in pipeline["stages"]] == [("sft", "finished"), ("ppo", "resumable")]
    assert found["reports"] == [{"path": "pipe/eval", "title": "Evaluation of sft, ppo", "created": None,
                                 "checkpoints": ["sft", "ppo"]}]
    ppo = next(r for r in found["runs"] if r["path"] == "pipe/ppo")
    assert (ppo["stage"], ppo["model"], ppo["last_step"], ppo["target_steps"]) == ("ppo", "tiny:1m", 2, 10)


def test_a_dead_processes_lock_is_not_running(tmp_path):
    run = make_run(tmp_path / "r", checkpoint=True)
    (run / ".lock").write_text(f"pid 999999999 on {platform.node()}\n")  # no such process
    assert runs.run_state(run)["state"] == "resumable"
    (run / ".lock").write_text(f"pid {os.getppid()} on {platform.node()}\n")  # a live process (this one's parent)
    assert runs.run_state(run)["state"] == "running"


def test_api_serves_records_incrementally_and_reports(root):
    api = client(root)
    page = api.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert api.get("/static/uPlot.iife.min.js").status_code == 200
    first = api.get("/api/run", params={"path": "pipe/ppo"}).json()
    assert first["count"] == 2 and first["records"] == RECORDS and first["run"]["state"] == "resumable"
    assert "interrupted by a signal" in first["run"]["detail"]
    later = api.get("/api/run", params={"path": "pipe/ppo", "since": 1}).json()
    assert later["records"] == RECORDS[1:]
    assert [p["title"] for p in first["panels"]][:2] == ["Reward", "KL to reference (per sequence)"]
    report = api.get("/api/report", params={"path": "pipe/eval"}).json()
    assert report["baseline"] == "sft" and report["checkpoints"]["ppo"]["samples"][1]["completion"] == "4"
    html = api.get("/report", params={"path": "pipe/eval"}).text
    assert "Greedy accuracy" in html and "&lt;b&gt;5&lt;/b&gt;" in html and "<b>5</b>" not in html
    assert api.get("/api/report", params={"path": "pipe/sft"}).status_code == 404  # no report.json there


def test_paths_outside_the_runs_directory_are_refused(root):
    api = client(root / "pipe")
    for path in ("../alone/live", "/etc", "sft/../../alone"):
        assert api.get("/api/run", params={"path": path}).status_code == 404, path
    assert api.get("/api/run", params={"path": "sft"}).status_code == 200


def test_completions_by_step(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "completions.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "prompt": "a", "completion": "b", "reward": 1.0},
        {"step": 20, "prompt": "a", "completion": "c", "reward": 0.0},
        {"step": 10, "prompt": "d", "completion": "e", "reward": 0.5}]) + "\n")
    found = runs.completions(run)
    assert found["steps"] == [10, 20]
    assert [r["completion"] for r in found["by_step"]["10"]] == ["b", "e"]


def test_token_guards_every_route(root):
    api = client(root, token="s3cret", loopback=False)
    assert api.get("/api/overview").status_code == 401
    assert api.get("/static/app.js").status_code == 401
    assert api.get("/api/overview", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get("/api/overview", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    first = api.get("/", params={"token": "s3cret"})  # the URL align dashboard prints
    assert first.status_code == 200 and "httponly" in first.headers["set-cookie"].lower()
    assert api.get("/api/overview").status_code == 200  # the cookie from then on


def test_loopback_refuses_other_host_names(root):
    from fastapi.testclient import TestClient

    from alignment.dashboard.app import create_app

    rebound = TestClient(create_app(root), base_url="http://attacker.example:8050")
    assert rebound.get("/api/overview").status_code == 421
    assert client(root).get("/api/overview").status_code == 200


def test_cli_refuses_a_public_host_without_a_token(tmp_path, capsys, monkeypatch):
    from alignment.cli import main

    assert main(["dashboard", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on non-loopback host '0.0.0.0' without a token" in capsys.readouterr().err
    monkeypatch.delenv("DASH_TOKEN", raising=False)
    assert main(["dashboard", str(tmp_path), "--host", "0.0.0.0", "--token-env", "DASH_TOKEN"]) == 2
    assert "DASH_TOKEN: that environment variable is not set" in capsys.readouterr().err
    assert main(["dashboard", str(tmp_path / "nowhere")]) == 2
    assert "no runs directory" in capsys.readouterr().err


def test_align_dashboard_serves_the_page(tmp_path):
    """The command itself: it prints its URL and answers there, on loopback."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    make_run(tmp_path / "runs" / "sft", complete=True, records=RECORDS, stage="sft")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "alignment.cli", "dashboard", str(tmp_path / "runs"),
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, answer = time.time() + 60, None
        while answer is None and time.time() < deadline and process.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/overview", timeout=2)
            except httpx.TransportError:
                time.sleep(0.2)
        assert answer is not None, process.stdout.read() if process.poll() is not None else "no answer in 60 s"
        assert [(r["path"], r["state"]) for r in answer.json()["runs"]] == [("sft", "finished")]
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert f"on http://127.0.0.1:{port}/" in output
