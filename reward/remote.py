"""Rewards over HTTP: a client (`RemoteReward`) and the reference server (`create_app`, `serve`).

Protocol (JSON over HTTP, documented in docs/rewards.md):

    POST <url>/score   {"prompts": [...], "completions": [...], "columns": {"answer": [...], ...}}
                    -> {"scores": [float | null, ...]}          one per completion, same order
    GET  <url>/health -> {"status": "ok"}

With a token configured, both endpoints need ``Authorization: Bearer <token>``
and answer 401 otherwise. Errors answer ``{"error": "..."}`` with 4xx (the
request is wrong: not retried) or 5xx (the scorer failed: retried).

The client retries, with exponential backoff, only connection errors,
timeouts, HTTP 5xx and 429; anything else is a `RewardError` at once. The
bearer token is read from an environment variable and never appears in a log
line, a repr or an error message.
"""

import hmac
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alignment.errors import RewardError
from reward.base import RewardSource, data_columns

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


class RemoteReward:
    """A reward source served over HTTP (see the module docstring for the protocol).

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000``; ``/score`` and ``/health`` are appended.
        token_env: name of the environment variable holding the bearer token (not the token).
        timeout: seconds per HTTP request.
        retries: retries after the first attempt, for retryable failures only.
        backoff: first retry delay in seconds; doubles each retry (capped at
            ``max_backoff``); a 429's numeric Retry-After is honoured up to the cap.
        health_check: ``GET /health`` now, RewardError if it fails.
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
    ):
        import httpx

        parts = urlsplit(url)
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
        self._client = httpx.Client(timeout=self.timeout, headers=headers, follow_redirects=False)
        if health_check:
            self.health()

    def __repr__(self) -> str:
        return f"RemoteReward({self.display_url!r}, token_env={self.token_env!r}, timeout={self.timeout})"

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: never the token (re-read from ``token_env`` on unpickling) nor the connection."""
        keys = ("url", "token_env", "timeout", "retries", "backoff", "max_backoff")
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

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[Any]:
        n = len(prompts)
        payload = {
            "prompts": list(prompts),
            "completions": list(completions),
            "columns": _jsonable_columns(columns, n, self.display_url),
        }
        resp = self._request("POST", "/score", payload, what="score")
        try:
            body = resp.json()
        except ValueError:
            raise RewardError(
                f"remote reward {self.display_url}/score: malformed JSON in the response: {self._snippet(resp.text)}"
            ) from None
        if not isinstance(body, dict) or "scores" not in body:
            keys = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise RewardError(
                f"remote reward {self.display_url}/score: the response has no 'scores' field (got {keys})"
            )
        scores = body["scores"]
        if not isinstance(scores, list):
            raise RewardError(
                f"remote reward {self.display_url}/score: 'scores' is a {type(scores).__name__}, expected a list"
            )
        if len(scores) != n:
            raise RewardError(
                f"remote reward {self.display_url}/score: expected {n} scores, got {len(scores)}"
            )
        return scores

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


# ---------------------------------------------------------------------------
# the reference server
# ---------------------------------------------------------------------------


def create_app(source_callable: Callable[..., Any], token: str | None = None) -> Any:
    """A FastAPI app serving ``source_callable`` with the protocol above.

    The callable is wrapped in a `RewardSource` (on_error="raise"), so a NaN,
    a wrong count or an exception answers HTTP 500 with the message, never a 0.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    if isinstance(source_callable, RewardSource):
        source = source_callable
    else:
        name = getattr(source_callable, "__name__", type(source_callable).__name__)
        source = RewardSource(source_callable, name=name, on_error="raise")
    # (no `from __future__ import annotations` in this module: FastAPI must see `Request` itself)
    expected = f"Bearer {token}".encode() if token else None
    app = FastAPI(title="reward server", docs_url=None, redoc_url=None, openapi_url=None)

    def unauthorized(request: Request) -> Any:
        if expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        return JSONResponse(
            {"error": "missing or wrong bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def bad(message: str) -> Any:
        return JSONResponse({"error": message}, status_code=422)

    @app.get("/health")
    async def health(request: Request):
        return unauthorized(request) or {"status": "ok", "source": source.name}

    @app.post("/score")
    async def score(request: Request):
        denied = unauthorized(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return bad("the body is not valid JSON")
        if not isinstance(body, dict):
            return bad("the body must be a JSON object with 'prompts' and 'completions'")
        unknown = sorted(set(body) - {"prompts", "completions", "columns"})
        if unknown:
            return bad(f"unknown field(s) {unknown}; expected 'prompts', 'completions', 'columns'")
        prompts, completions = body.get("prompts"), body.get("completions")
        columns = body.get("columns") or {}
        if not isinstance(prompts, list) or not isinstance(completions, list):
            return bad("'prompts' and 'completions' must be lists")
        if len(prompts) != len(completions):
            return bad(f"{len(prompts)} prompts but {len(completions)} completions")
        if not isinstance(columns, dict):
            return bad("'columns' must be an object of lists")
        for key, values in columns.items():
            if not isinstance(values, list) or len(values) != len(prompts):
                return bad(f"column '{key}' must be a list of {len(prompts)} values")
        try:
            scores = await run_in_threadpool(source, prompts, completions, **columns)
        except RewardError as exc:
            logger.error("reward server: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=500)
        except Exception as exc:  # noqa: BLE001 - report, never crash the server
            logger.exception("reward server: unexpected failure")
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        return {"scores": scores}

    return app


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    source: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_env: str | None = None,
    log_level: str = "info",
    **kwargs: Any,
) -> None:
    """Serve any source string `reward.registry.resolve` accepts (kwargs go to it).

    Binds to loopback by default; any other host requires a token (read from
    the environment variable ``token_env``), or this raises `RewardError`.
    """
    token = None
    if token_env:
        token = os.environ.get(token_env, "")
        if not token:
            raise RewardError(
                f"reward server: environment variable {token_env} is not set (it must hold the token)"
            )
    if not is_loopback(host) and not token:
        raise RewardError(
            f"reward server: refusing to bind to non-loopback host {host!r} without a token; "
            "set token_env to an environment variable holding one, or bind to 127.0.0.1"
        )
    from reward.registry import resolve

    app = create_app(resolve(source, **kwargs), token=token)
    import uvicorn

    logger.info(
        "reward server: serving %s on http://%s:%d (auth %s)", source, host, port, "on" if token else "off"
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
