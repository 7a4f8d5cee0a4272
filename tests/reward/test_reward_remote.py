"""The HTTP reward client and reference server, against real servers on 127.0.0.1.

A scripted fake scorer answers each request with the next scripted action
(sleep, HTTP status, raw body), so every failure mode of the protocol is
exercised over a real socket.
"""

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from alignment.errors import RewardError  # noqa: E402
from reward import RewardSource, build, resolve  # noqa: E402
from reward.remote import RemoteReward, create_app, is_loopback, serve  # noqa: E402

TOKEN = "tok-3f9a1c77e2-very-secret"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
P = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"]
C = ["2", "four", "six!"]


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(5)


class Script:
    """The scripted fake scorer: per path, a queue of actions; every request is recorded."""

    def __init__(self):
        self.actions = {"/score": [], "/health": []}
        self.requests = []

    def reset(self):
        self.actions = {"/score": [], "/health": []}
        self.requests = []

    def count(self, path):
        return sum(1 for r in self.requests if r["path"] == path)


def scripted_app(script):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()

    async def respond(request: Request, path: str):
        body = await request.json() if path == "/score" else None
        script.requests.append({"path": path, "headers": dict(request.headers), "body": body})
        queue = script.actions[path]
        action = queue.pop(0) if queue else ("ok",)
        kind = action[0]
        if kind == "sleep":
            await asyncio.sleep(action[1])
        elif kind == "status":
            headers = {"Retry-After": str(action[2])} if len(action) > 2 else None
            return JSONResponse({"error": f"scripted {action[1]}"}, status_code=action[1], headers=headers)
        elif kind == "raw":
            return Response(action[1], media_type="application/json")
        elif kind == "json":
            return JSONResponse(action[1])
        if path == "/health":
            return {"status": "ok"}
        return {"scores": [float(len(c)) for c in body["completions"]]}

    @app.get("/health")
    async def health(request: Request):
        return await respond(request, "/health")

    @app.post("/score")
    async def score(request: Request):
        return await respond(request, "/score")

    return app


@pytest.fixture(scope="module")
def fake():
    script = Script()
    server = ServerThread(scripted_app(script))
    yield script, server.url
    server.stop()


@pytest.fixture
def fake_server(fake):
    script, url = fake
    script.reset()
    return script, url


def client(url, **kw):
    kw.setdefault("timeout", 2)
    kw.setdefault("retries", 3)
    kw.setdefault("backoff", 0.01)
    return RemoteReward(url, **kw)


# --- the client against the scripted server ------------------------------------


def test_round_trip_sends_data_columns_only(fake_server):
    script, url = fake_server
    with client(url) as rm:
        out = rm(P, C, answer=[2, 4, 6], trainer_state=object(), log_metric=print)
    assert out == [1.0, 4.0, 4.0]
    sent = script.requests[-1]["body"]
    assert sent == {"prompts": P, "completions": C, "columns": {"answer": [2, 4, 6]}}
    assert script.count("/health") == 1  # the health check at construction


def test_timeout_is_retried_a_bounded_number_of_times(fake_server):
    script, url = fake_server
    rm = client(url, timeout=0.2, retries=2)
    script.actions["/score"] = [("sleep", 1.5)] * 5
    t0 = time.monotonic()
    with pytest.raises(
        RewardError, match=r"/score: score gave up after 3 attempt\(s\); last error: timed out after 0.2 s"
    ):
        rm(P, C)
    assert script.count("/score") == 3
    assert time.monotonic() - t0 < 2.0


def test_http_500_then_success_is_retried(fake_server, caplog):
    script, url = fake_server
    rm = client(url)
    script.actions["/score"] = [("status", 500), ("status", 503)]
    with caplog.at_level(logging.WARNING, logger="reward"):
        assert rm(P, C) == [1.0, 4.0, 4.0]
    assert script.count("/score") == 3
    assert "HTTP 500" in caplog.text and "retry 1 of 3" in caplog.text


def test_http_429_is_retried_honouring_retry_after(fake_server):
    script, url = fake_server
    rm = client(url)
    script.actions["/score"] = [("status", 429, 0)]
    assert rm(P, C) == [1.0, 4.0, 4.0]
    assert script.count("/score") == 2


def test_http_401_is_an_error_at_once_without_the_token(fake_server, monkeypatch):
    script, url = fake_server
    monkeypatch.setenv("TEST_RM_TOKEN", TOKEN)
    rm = client(url, token_env="TEST_RM_TOKEN")
    assert script.requests[-1]["headers"]["authorization"] == f"Bearer {TOKEN}"  # it is sent
    script.actions["/score"] = [("status", 401)] * 5
    with pytest.raises(RewardError) as info:
        rm(P, C)
    assert "HTTP 401" in str(info.value) and "TEST_RM_TOKEN" in str(info.value)
    assert TOKEN not in str(info.value)
    assert script.count("/score") == 1  # not retried


@pytest.mark.parametrize("status", [403, 404, 400])
def test_other_4xx_are_errors_at_once(fake_server, status):
    script, url = fake_server
    rm = client(url)
    script.actions["/score"] = [("status", status)] * 5
    with pytest.raises(RewardError, match=f"HTTP {status}"):
        rm(P, C)
    assert script.count("/score") == 1


def test_malformed_json_is_an_error_at_once(fake_server):
    script, url = fake_server
    rm = client(url)
    script.actions["/score"] = [("raw", "{scores: oops")]
    with pytest.raises(RewardError, match="malformed JSON in the response: '{scores: oops'"):
        rm(P, C)
    assert script.count("/score") == 1


def test_missing_scores_field(fake_server):
    script, url = fake_server
    rm = client(url)
    script.actions["/score"] = [("json", {"score": [1, 2, 3]})]
    with pytest.raises(RewardError, match=r"no 'scores' field \(got \['score'\]\)"):
        rm(P, C)


def test_wrong_number_of_scores(fake_server):
    script, url = fake_server
    rm = client(url)
    script.actions["/score"] = [("json", {"scores": [1.0]})]
    with pytest.raises(RewardError, match="expected 3 scores, got 1"):
        rm(P, C)


def test_nan_from_the_server_is_never_a_zero(fake_server):
    script, url = fake_server
    src = RewardSource(client(url), name="remote")
    script.actions["/score"] = [("raw", '{"scores": [1.0, NaN, 2.0]}')]
    with pytest.raises(RewardError, match="'remote' returned an invalid score for sample 1: NaN"):
        src(P, C)


def test_health_check_failure_at_construction(fake_server):
    script, url = fake_server
    script.actions["/health"] = [("status", 503)] * 10
    with pytest.raises(
        RewardError, match=r"/health: health check gave up after 3 attempt\(s\); last error: HTTP 503"
    ):
        client(url, retries=2)
    assert script.count("/health") == 3


def test_unreachable_server_fails_the_health_check():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(RewardError, match="health check gave up after 2 attempt.*connection failed"):
        client(f"http://127.0.0.1:{port}", retries=1)


def test_missing_token_variable(fake_server, monkeypatch):
    _, url = fake_server
    monkeypatch.delenv("TEST_RM_UNSET", raising=False)
    with pytest.raises(RewardError, match="environment variable TEST_RM_UNSET is not set"):
        client(url, token_env="TEST_RM_UNSET")


def test_token_never_logged_or_shown(fake_server, monkeypatch, caplog):
    script, url = fake_server
    monkeypatch.setenv("TEST_RM_TOKEN", TOKEN)
    with caplog.at_level(logging.DEBUG):  # every logger, httpx/httpcore included
        rm = client(url, token_env="TEST_RM_TOKEN")
        script.actions["/score"] = [("status", 500), ("status", 429, 0)]
        assert rm(P, C) == [1.0, 4.0, 4.0]
        script.actions["/score"] = [("status", 401)]
        with pytest.raises(RewardError) as info:
            rm(P, C)
        script.actions["/score"] = [("raw", f"echoing {TOKEN} back")]
        with pytest.raises(RewardError) as echoed:
            rm(P, C)
    assert caplog.records  # something was logged at all
    assert TOKEN not in caplog.text
    assert TOKEN not in str(info.value) and TOKEN not in str(echoed.value)
    assert TOKEN not in repr(rm) and TOKEN not in repr(vars(rm)["_token"])


def test_pickled_client_carries_settings_not_the_token(fake_server, monkeypatch):
    import pickle

    script, url = fake_server
    monkeypatch.setenv("TEST_RM_TOKEN", TOKEN)
    rm = client(url, token_env="TEST_RM_TOKEN", retries=1)
    blob = pickle.dumps(RewardSource(rm, name="remote"))
    assert TOKEN.encode() not in blob
    clone = pickle.loads(blob)  # e.g. in a spawned rollout worker, with the same environment
    assert clone(P, C) == [1.0, 4.0, 4.0]
    assert script.requests[-1]["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert clone.fn.retries == 1


# --- the reference server ------------------------------------------------------


@pytest.fixture(scope="module")
def reference_server():
    def scorer(prompts, completions, answer):
        return [float(str(a) in c) if a is not None else None for c, a in zip(completions, answer)]

    def nan_scorer(prompts, completions, **kwargs):
        return [float("nan")] * len(completions)

    secured = ServerThread(create_app(scorer, token=TOKEN))
    broken = ServerThread(create_app(nan_scorer))
    yield secured.url, broken.url
    secured.stop()
    broken.stop()


def test_reference_server_requires_the_token(reference_server):
    url, _ = reference_server
    payload = {"prompts": P, "completions": C, "columns": {"answer": [2, 4, None]}}
    assert httpx.post(f"{url}/score", json=payload).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 401
    wrong = httpx.post(f"{url}/score", json=payload, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = httpx.post(f"{url}/score", json=payload, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json() == {"scores": [1.0, 0.0, None]}


def test_reference_server_rejects_bad_requests_with_422(reference_server):
    url, _ = reference_server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (
        httpx.post(f"{url}/score", json={"prompts": ["a"], "completions": []}, headers=auth).status_code
        == 422
    )
    r = httpx.post(f"{url}/score", json={"prompts": ["a"], "completions": ["b"], "colums": {}}, headers=auth)
    assert r.status_code == 422 and "colums" in r.json()["error"]
    r = httpx.post(f"{url}/score", content=b"{not json", headers=auth)
    assert r.status_code == 422


def test_client_and_reference_server_end_to_end(reference_server, monkeypatch):
    url, _ = reference_server
    monkeypatch.setenv("TEST_RM_TOKEN", TOKEN)
    combined = build([{"source": url, "name": "judge", "token_env": "TEST_RM_TOKEN", "timeout": 5}])
    result = combined(P, C, answer=[2, 4, None])
    assert result.per_source["judge"] == [1.0, 0.0, None]
    assert result.metrics["reward/judge"] == 0.5
    monkeypatch.setenv("TEST_RM_TOKEN", "wrong-token")
    with pytest.raises(RewardError, match="health check refused, HTTP 401"):
        build([{"source": url, "token_env": "TEST_RM_TOKEN"}])


def test_server_side_nan_is_an_error_not_a_zero(reference_server):
    _, url = reference_server
    rm = client(url, retries=0)
    with pytest.raises(RewardError, match="HTTP 500.*invalid score for sample 0: NaN"):
        rm(P, C)


def test_serve_refuses_a_public_host_without_a_token(monkeypatch):
    with pytest.raises(RewardError, match="refusing to bind to non-loopback host '0.0.0.0' without a token"):
        serve("answer_match", host="0.0.0.0")
    monkeypatch.delenv("TEST_RM_UNSET", raising=False)
    with pytest.raises(RewardError, match="TEST_RM_UNSET is not set"):
        serve("answer_match", host="0.0.0.0", token_env="TEST_RM_UNSET")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_serve_runs_a_source_string_in_a_subprocess():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code = (
        "from reward.remote import serve;"
        f"serve('tests/reward/fixtures/my_reward.py:starts_with_answer', port={port}, log_level='warning')"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        rm = RemoteReward(f"http://127.0.0.1:{port}", retries=40, backoff=0.05, max_backoff=0.25)
        assert rm(["q", "q"], ["12 apples", "7"], answer=[12, 12]) == [1.0, 0.0]
    finally:
        proc.terminate()
        proc.wait(10)


def test_resolve_url_builds_a_remote_client(fake_server):
    _, url = fake_server
    rm = resolve(url, timeout=1, retries=0)
    assert isinstance(rm, RemoteReward) and rm.retries == 0
