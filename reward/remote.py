"""Rewards over HTTP: the client (`RemoteReward`); the server is `reward.server` (re-exported here).

Three protocols (`reward.protocols`): ours ("align", below), OpenRLHF's remote reward model
(``POST /get_reward``) and LLaMA-Factory's ``reward_model_type: api``. Ours
(JSON over HTTP, documented in docs/rewards.md):

    POST <url>/score   {"prompts": [...], "completions": [...], "columns": {"answer": [...], ...}}
                    -> {"scores": [float | null, ...]}          one per completion, same order
    GET  <url>/health -> {"status": "ok"}

With a token configured, both endpoints need ``Authorization: Bearer <token>``
and answer 401 otherwise. Errors answer ``{"error": "..."}`` with 4xx (the
request is wrong: not retried) or 5xx (the scorer failed: retried).

The client retries, with exponential backoff, only connection errors,
timeouts, HTTP 5xx and 429; anything else is a `RewardError` at once. The
bearer token is read from an environment variable and never appears in a log
line, a repr or an error message. All of that holds for every protocol.

Limits, as verl's rate-limited reward manager has: ``requests_per_minute``
(every HTTP attempt, retries included, waits for its slot) and ``max_in_flight``
(concurrent requests when a call is split into ``batch_size`` chunks).
"""

import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from reward.base import data_columns
from reward.errors import RewardError
from reward.protocols import PATHS, PROTOCOLS, ProtocolError, decode_response, encode_request

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))


class _Secret:
    """A string that never shows itself in repr/str."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


def _display_url(url: str) -> str:
    """The URL without user:password@ (credentials never go into messages)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _jsonable_columns(columns: dict[str, Any], n: int, where: str) -> dict[str, list[Any]]:
    """Dataset columns that can travel as JSON (NaN -> null); others dropped with a warning."""
    out = {}
    for key, values in data_columns(columns, n).items():
        values = [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]
        try:
            json.dumps(values, allow_nan=False)
        except (TypeError, ValueError) as exc:
            logger.warning(
                "remote reward %s: column '%s' is not JSON-serialisable (%s); not sent", where, key, exc
            )
            continue
        out[key] = values
    return out


class RateLimiter:
    """At most ``per_minute`` acquisitions in any 60 s, spaced evenly (one every 60/per_minute s)."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for the next slot; returns the seconds waited."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        wait = start - now
        if wait > 0:
            time.sleep(wait)
        return wait


def _positive_or_none(value: Any, what: str, where: str, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds) or value <= 0):
        raise RewardError(f"remote reward {where}: {what} must be a positive {'integer' if integer else 'number'}, "
                          f"got {value!r}")


class RemoteReward:
    """A reward source served over HTTP (see the module docstring for the protocol).

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000``; ``/score`` and ``/health`` are appended.
        token_env: name of the environment variable holding the bearer token (not the token).
        timeout: seconds per HTTP request.
        retries: retries after the first attempt, for retryable failures only.
        backoff: first retry delay in seconds; doubles each retry (capped at
            ``max_backoff``); a 429's numeric Retry-After is honoured up to the cap.
        health_check: ``GET /health`` now, RewardError if it fails (protocol "align" only:
            the others define no health endpoint).
        protocol: "align" | "openrlhf" | "llamafactory" (`reward.protocols`). For the last two a URL
            without a path gets the protocol's path (``/get_reward``, ``/v1/score/evaluation``); a URL
            with one is posted to as it is, as OpenRLHF's ``--remote_rm_url`` is.
        requests_per_minute: rate limit over every HTTP attempt; None: unlimited.
        max_in_flight: concurrent requests of one call (with ``batch_size``); default 1.
        batch_size: samples per request; None: the whole call in one request.
        model: the ``model`` field of LLaMA-Factory's request.
    """

    def __init__(
        self,
        url: str,
        token_env: str | None = None,
        timeout: float = 10,
        retries: int = 3,
        backoff: float = 0.2,
        health_check: bool = True,
        max_backoff: float = 30.0,
        protocol: str = "align",
        requests_per_minute: float | None = None,
        max_in_flight: int = 1,
        batch_size: int | None = None,
        model: str = "model",
    ):
        import httpx

        parts = urlsplit(url)
        if protocol not in PROTOCOLS:
            raise RewardError(f"remote reward {_display_url(url)}: protocol must be one of {PROTOCOLS}, "
                              f"got {protocol!r}")
        _positive_or_none(requests_per_minute, "requests_per_minute", _display_url(url))
        _positive_or_none(max_in_flight, "max_in_flight", _display_url(url), integer=True)
        _positive_or_none(batch_size, "batch_size", _display_url(url), integer=True)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RewardError(f"remote reward: not an http(s) URL: {_display_url(url)!r}")
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise RewardError(f"remote reward {_display_url(url)}: timeout must be > 0, got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise RewardError(
                f"remote reward {_display_url(url)}: retries must be an integer >= 0, got {retries!r}"
            )
        if not (isinstance(backoff, int | float) and backoff >= 0):
            raise RewardError(f"remote reward {_display_url(url)}: backoff must be >= 0, got {backoff!r}")
        self.url = url.rstrip("/")
        self.protocol = protocol
        # ours appends its paths to a base URL; the others post to the URL given, or to their path under it
        self.score_path = PATHS[protocol] if protocol == "align" or not parts.path.strip("/") else ""
        self.requests_per_minute, self.max_in_flight = requests_per_minute, max_in_flight
        self.batch_size, self.model = batch_size, model
        self._limiter = RateLimiter(requests_per_minute)
        self.display_url = _display_url(self.url)
        self.token_env = token_env
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        headers = {}
        self._token: _Secret | None = None
        if token_env:
            value = os.environ.get(token_env, "")
            if not value:
                raise RewardError(
                    f"remote reward {self.display_url}: environment variable {token_env} is not set "
                    "(it must hold the bearer token)"
                )
            self._token = _Secret(value)
            headers["Authorization"] = f"Bearer {value}"
        limits = httpx.Limits(max_connections=max_in_flight)
        self._client = httpx.Client(timeout=self.timeout, headers=headers, follow_redirects=False, limits=limits)
        if health_check and protocol == "align":
            self.health()

    def __repr__(self) -> str:
        return (f"RemoteReward({self.display_url!r}, protocol={self.protocol!r}, token_env={self.token_env!r}, "
                f"timeout={self.timeout})")

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: never the token (re-read from ``token_env`` on unpickling) nor the connection."""
        keys = ("url", "token_env", "timeout", "retries", "backoff", "max_backoff", "protocol",
                "requests_per_minute", "max_in_flight", "batch_size", "model")
        return {k: getattr(self, k) for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # e.g. in a spawned rollout worker: same environment, so the same token; no second health check
        self.__init__(state.pop("url"), health_check=False, **state)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteReward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- protocol --------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /health``; RewardError if the server is unreachable or unhealthy."""
        resp = self._request("GET", "/health", None, what="health check")
        try:
            return resp.json()
        except ValueError:
            return {}

    def __call__(self, prompts: list[Any], completions: list[Any], log_metric: Any = None,
                 **columns: Any) -> list[Any]:
        n = len(prompts)
        columns = _jsonable_columns(columns, n, self.display_url)
        size = self.batch_size or max(n, 1)
        chunks = [range(start, min(start + size, n)) for start in range(0, n, size)]

        def score_chunk(rows: range) -> tuple[list[Any], dict[str, Any]]:
            payload = encode_request(self.protocol, [prompts[i] for i in rows], [completions[i] for i in rows],
                                     {k: [v[i] for i in rows] for k, v in columns.items()}, model=self.model)
            return self._score(payload, len(rows))

        if len(chunks) > 1 and self.max_in_flight > 1:
            with ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="remote-reward") as pool:
                answers = list(pool.map(score_chunk, chunks))
        else:
            answers = [score_chunk(rows) for rows in chunks]
        if log_metric is not None:
            from reward.conventions import log_metrics

            for _, logs in answers:
                for key, value in log_metrics(logs).items():
                    log_metric(key, value)
        return [score for scores, _ in answers for score in scores]

    def post_json(self, path: str, payload: Any, what: str) -> Any:
        """POST with this client's retries, limits, auth and redaction; the parsed JSON answer.

        RewardError naming the URL for a refused, failed or malformed answer (also used by `reward.judge`)."""
        resp = self._request("POST", path, payload, what=what)
        try:
            return resp.json()
        except ValueError:
            raise RewardError(
                f"remote reward {self.display_url}{path}: malformed JSON in the response: {self._snippet(resp.text)}"
            ) from None

    def _score(self, payload: dict[str, Any], n: int) -> tuple[list[Any], dict[str, Any]]:
        """One request: the scores and what the protocol says to log; RewardError naming the URL otherwise."""
        target = f"{self.display_url}{self.score_path}"
        body = self.post_json(self.score_path, payload, what="score")
        try:
            return decode_response(self.protocol, body, n)
        except ProtocolError as exc:
            raise RewardError(f"remote reward {target} ({self.protocol} protocol): the response {exc}") from None

    # -- transport -------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._token is not None and self._token.get():
            text = text.replace(self._token.get(), "***")
        return text

    def _snippet(self, text: str, limit: int = 200) -> str:
        text = self._scrub(text.strip())
        return repr(text if len(text) <= limit else text[:limit] + "...")

    def _request(self, method: str, path: str, payload: Any, what: str) -> Any:
        import httpx

        target = f"{self.display_url}{path}"
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            retry_after: float | None = None
            self._limiter.acquire()
            try:
                resp = self._client.request(method, self.url + path, json=payload)
            except httpx.TimeoutException as exc:
                last = f"timed out after {self.timeout:g} s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last = f"connection failed ({type(exc).__name__}: {self._scrub(str(exc))})"
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    return resp
                if status in (401, 403):
                    how = (
                        f"the token in ${self.token_env}"
                        if self.token_env
                        else "no token was sent (set token_env)"
                    )
                    raise RewardError(f"remote reward {target}: {what} refused, HTTP {status} (check {how})")
                if status not in RETRY_STATUS:
                    raise RewardError(
                        f"remote reward {target}: {what} failed, HTTP {status}: {self._snippet(resp.text)}"
                    )
                last = f"HTTP {status}: {self._snippet(resp.text)}"
                if status == 429:
                    try:
                        retry_after = float(resp.headers.get("retry-after", ""))
                    except ValueError:
                        retry_after = None
            if attempt + 1 < attempts:
                delay = min(self.backoff * 2**attempt, self.max_backoff)
                if retry_after is not None and retry_after >= 0:
                    delay = min(retry_after, self.max_backoff)
                logger.warning(
                    "remote reward %s: %s %s; retry %d of %d in %.2f s",
                    target,
                    what,
                    last,
                    attempt + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
        raise RewardError(
            f"remote reward {target}: {what} gave up after {attempts} attempt(s); last error: {last}"
        )


# the server's old home: imported from here by earlier code
from reward.server import create_app, is_loopback, serve  # noqa: E402,F401
