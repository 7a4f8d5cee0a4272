"""OpenRLHF's and LLaMA-Factory's reward protocols over real loopback HTTP, both ways, with every fault.

The fake servers here are written from the protocols' own descriptions (reward.protocols), not with the
toolkit's server: OpenRLHF's remote RM takes ``{"query", "prompts", "labels"}`` at ``/get_reward`` and answers
``{"rewards", "scores", "extra_logs"}``; LLaMA-Factory's API reward takes ``{"model", "messages"}`` and answers
``{"scores"}``.
"""

import os
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from alignment.errors import RewardError  # noqa: E402
from reward import build  # noqa: E402
from reward.remote import RateLimiter, RemoteReward  # noqa: E402
from reward.server import create_app  # noqa: E402
from tests.reward.test_reward_remote import ROOT, ServerThread  # noqa: E402

TOKEN = "tok-protocols-8e21-secret"
P = ["What is 1 + 1? ", "What is 2 + 2? ", "What is 3 + 3? "]
C = ["2", "5", "6"]
ANSWERS = [2, 4, 6]
PATH = {"openrlhf": "/get_reward", "llamafactory": "/v1/score/evaluation"}


class Fake:
    """A scorer speaking one foreign protocol; per request, the next scripted action (default: score)."""

    def __init__(self, protocol):
        self.protocol, self.actions, self.requests = protocol, [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def scores(self, body):
        texts = body["query"] if self.protocol == "openrlhf" else body["messages"]
        labels = body.get("labels") or [None] * len(texts)
        return [float(t.endswith(str(label))) if label is not None else float(len(t)) for t, label in
                zip(texts, labels)]

    def answer(self, body):
        scores = self.scores(body)
        if self.protocol == "openrlhf":
            return {"rewards": scores, "scores": scores, "extra_logs": {"chars": [float(len(q)) for q in body["query"]]}}
        return {"id": "x", "model": body["model"], "scores": scores}


def fake_app(fake):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()

    @app.post(PATH[fake.protocol])
    async def score(request: Request):
        import asyncio

        body = await request.json()
        fake.requests.append({"headers": dict(request.headers), "body": body})
        with fake.lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            action = fake.actions.pop(0) if fake.actions else ("ok",)
            kind = action[0]
            if kind == "sleep":
                await asyncio.sleep(action[1])
            if kind == "status":
                return JSONResponse({"error": "scripted"}, status_code=action[1], headers=action[2] if len(action) > 2 else None)
            if kind == "auth" and request.headers.get("authorization") != f"Bearer {TOKEN}":
                return JSONResponse({"error": "no"}, status_code=401)
            if kind == "raw":
                return Response(action[1], media_type="application/json")
            if kind == "short":
                answer = fake.answer(body)
                key = "rewards" if fake.protocol == "openrlhf" else "scores"
                answer[key] = answer[key][:-1]
                return answer
            await asyncio.sleep(0.05)  # long enough for concurrent requests to overlap
            return fake.answer(body)
        finally:
            with fake.lock:
                fake.in_flight -= 1

    return app


@pytest.fixture(params=["openrlhf", "llamafactory"])
def fake(request):
    fake = Fake(request.param)
    server = ServerThread(fake_app(fake))
    fake.url = server.url
    yield fake
    server.stop()


def client(fake, **kwargs):
    kwargs = {"retries": 2, "backoff": 0.01, "timeout": 2, **kwargs}
    return RemoteReward(fake.url, protocol=fake.protocol, **kwargs)


def test_round_trip_sends_the_protocols_request_exactly(fake):
    combined = build([{"source": fake.url, "protocol": fake.protocol, "name": "remote", "columns": {"labels": "answer"}}])
    result = combined(P, C, answer=ANSWERS)
    body = fake.requests[-1]["body"]
    if fake.protocol == "openrlhf":
        assert body == {"query": [p + c for p, c in zip(P, C)], "prompts": P, "labels": ANSWERS}
        assert result.per_source["remote"] == [1.0, 0.0, 1.0]
        assert result.metrics["reward/remote/scores"] == pytest.approx(2 / 3)  # OpenRLHF's scores, logged
        assert result.metrics["reward/remote/chars"] == pytest.approx(sum(len(p + c) for p, c in zip(P, C)) / 3)
    else:
        assert body == {"model": "model", "messages": [p + c for p, c in zip(P, C)]}
        assert result.per_source["remote"] == [float(len(p + c)) for p, c in zip(P, C)]


def test_timeout_is_retried_then_gives_up(fake):
    fake.actions = [("sleep", 1.0)] * 3
    with pytest.raises(RewardError, match=r"gave up after 2 attempt\(s\); last error: timed out after 0.3 s"):
        client(fake, timeout=0.3, retries=1)(P, C)
    assert len(fake.requests) == 2


@pytest.mark.parametrize("status", [500, 503, 429])
def test_5xx_and_429_are_retried(fake, status):
    fake.actions = [("status", status, {"retry-after": "0"})]
    assert len(client(fake)(P, C)) == 3
    assert len(fake.requests) == 2


def test_401_is_an_error_at_once_naming_the_token_variable(fake, monkeypatch):
    monkeypatch.setenv("PROTO_TOKEN", "wrong-token-value")
    fake.actions = [("auth",)]
    with pytest.raises(RewardError, match=r"score refused, HTTP 401 \(check the token in \$PROTO_TOKEN\)") as info:
        client(fake, token_env="PROTO_TOKEN")(P, C)
    assert "wrong-token-value" not in str(info.value) and len(fake.requests) == 1


def test_malformed_json_is_an_error_never_a_zero(fake):
    fake.actions = [("raw", "{not json")]
    with pytest.raises(RewardError, match=rf"{PATH[fake.protocol]}: malformed JSON in the response"):
        client(fake)(P, C)


def test_wrong_count_is_an_error_naming_the_protocol(fake):
    fake.actions = [("short",)]
    with pytest.raises(RewardError, match=rf"\({fake.protocol} protocol\): the response expected 3 scores, got 2"):
        client(fake)(P, C)


def test_skip_mode_counts_a_protocol_failure_and_scores_none(fake):
    fake.actions = [("raw", "[]")]
    combined = build([{"source": fake.url, "protocol": fake.protocol, "name": "remote", "on_error": "skip"}])
    result = combined(P, C)
    assert result.total == [None, None, None] and result.metrics["reward/remote/failures"] == 1.0


def test_in_flight_limit_bounds_concurrent_requests(fake):
    scores = client(fake, batch_size=1, max_in_flight=2)(P * 2, C * 2)
    assert len(scores) == 6 and len(fake.requests) == 6
    assert fake.max_in_flight == 2  # overlapped (each answer takes 50 ms), never more than the limit


def test_requests_per_minute_spaces_every_attempt():
    limiter = RateLimiter(per_minute=600)  # one every 0.1 s
    start = time.monotonic()
    for _ in range(4):
        limiter.acquire()
    assert 0.29 <= time.monotonic() - start < 1.0


def test_rate_limit_applies_to_the_client(fake):
    start = time.monotonic()
    client(fake, batch_size=1, requests_per_minute=1200)(P, C)  # 3 requests, 50 ms apart at least
    assert time.monotonic() - start >= 0.1 and len(fake.requests) == 3


# ------------------------------------------------------------------ our server, their clients


@pytest.fixture(scope="module")
def served_openrlhf():
    """`align serve-reward <an OpenRLHF reward_func> --protocol openrlhf` on a free loopback port."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "serve-reward",
                             "examples/rewards/openrlhf_reward_func.py:reward_func", "--protocol",
                             "openrlhf", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"serve-reward did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


def test_serve_reward_answers_an_openrlhf_request(served_openrlhf):
    # the request OpenRLHF's remote reward client sends: whole sequences, prompts, labels
    body = {"query": [p + c for p, c in zip(P, C)], "prompts": P, "labels": ANSWERS}
    answer = httpx.post(served_openrlhf + "/get_reward", json=body).json()
    # the served OpenRLHF reward_func: 1.0 where the query ends with its label
    assert answer == {"rewards": [1.0, 0.0, 1.0], "scores": [1.0, 0.0, 1.0], "extra_logs": {}}


def test_serve_reward_protocol_faults_are_422_never_a_score(served_openrlhf):
    assert httpx.post(served_openrlhf + "/get_reward", content=b"{bad").status_code == 422
    resp = httpx.post(served_openrlhf + "/get_reward", json={"query": ["x"], "prompts": ["y"], "labels": [1]})
    assert resp.status_code == 422 and "query 0 does not start with its prompt" in resp.text
    resp = httpx.post(served_openrlhf + "/get_reward", json={"prompts": ["y"]})
    assert resp.status_code == 422 and "no 'query' field" in resp.text
    assert httpx.post(served_openrlhf + "/score", json={"prompts": [], "completions": []}).status_code in (404, 405)


def test_our_client_and_our_server_on_each_foreign_protocol():
    def scorer(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    for protocol in ("openrlhf", "llamafactory"):
        server = ServerThread(create_app(scorer, token=TOKEN, protocol=protocol))
        os.environ["PROTO_OK_TOKEN"] = TOKEN
        try:
            remote = RemoteReward(server.url, protocol=protocol, token_env="PROTO_OK_TOKEN", backoff=0.01)
            scores = remote(P, C)
            with pytest.raises(RewardError, match="HTTP 401"):
                RemoteReward(server.url, protocol=protocol, retries=0)(P, C)
        finally:
            del os.environ["PROTO_OK_TOKEN"]
            server.stop()
        # OpenRLHF: the completion cut out of the query; LLaMA-Factory: the whole sequence is the completion
        expected = [1.0, 1.0, 1.0] if protocol == "openrlhf" else [float(len(p + c)) for p, c in zip(P, C)]
        assert scores == expected, protocol
