"""The reward server: any source over HTTP, in our protocol, OpenRLHF's or LLaMA-Factory's (`reward.protocols`).

    app = create_app(source, protocol="openrlhf")      # POST /get_reward, as OpenRLHF's remote RM
    serve("runs/tiny/reward_model", protocol="llamafactory", port=8001)

Every protocol answers ``GET /health`` too. The source is wrapped in a `RewardSource` (on_error="raise"), so
a NaN, a wrong count or an exception answers HTTP 500 with the message, never a 0; a request that breaks its
protocol answers 422 naming the field; with a token, anything without ``Authorization: Bearer <token>``
answers 401.
"""

import hmac
import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Any

from reward.base import RewardSource
from reward.errors import RewardError
from reward.protocols import PATHS, PROTOCOLS, ProtocolError, decode_request, encode_response

logger = logging.getLogger(__name__)


def create_app(source_callable: Callable[..., Any], token: str | None = None, protocol: str = "align") -> Any:
    """A FastAPI app serving ``source_callable`` on ``protocol``'s path (`reward.protocols.PATHS`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    if protocol not in PROTOCOLS:
        raise RewardError(f"reward server: protocol must be one of {PROTOCOLS}, got {protocol!r}")
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
        return unauthorized(request) or {"status": "ok", "source": source.name, "protocol": protocol}

    @app.post(PATHS[protocol])
    async def score(request: Request):
        denied = unauthorized(request)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return bad("the body is not valid JSON")
        try:
            prompts, completions, columns = decode_request(protocol, body)
        except ProtocolError as exc:
            return bad(f"{protocol} protocol: {exc}")
        try:
            scores = await run_in_threadpool(source, prompts, completions, **columns)
        except RewardError as exc:
            logger.error("reward server: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=500)
        except Exception as exc:  # noqa: BLE001 - report, never crash the server
            logger.exception("reward server: unexpected failure")
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
        return encode_response(protocol, scores)

    return app


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, token_env: str | None, risk: str) -> str | None:
    """Why serving on `host` with the token in `token_env` must be refused, or None.

    One policy for every server we ship (the reward server, the dashboard): a host other than loopback needs a
    token, and a named token variable must be set.  `risk` says what an open socket would give away.
    """
    if token_env and not os.environ.get(token_env):
        return f"--token-env {token_env}: that environment variable is not set (it must hold the token)"
    if not is_loopback(host) and not token_env:
        return (f"refusing to serve on non-loopback host {host!r} without a token: {risk}. Put a token in an "
                "environment variable and pass --token-env NAME, or bind to 127.0.0.1")
    return None


def add_bind_arguments(parser, default_port: int, token_help: str) -> None:
    """--host (default 127.0.0.1), --port and --token-env, the same for every server command."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other needs --token-env)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    parser.add_argument("--token-env", default=None, metavar="NAME", help=token_help)


def serve(
    source: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_env: str | None = None,
    log_level: str = "info",
    protocol: str = "align",
    **kwargs: Any,
) -> None:
    """Serve any source string `reward.registry.resolve` accepts (kwargs go to it) on ``protocol``.

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
    from reward.conventions import adapt
    from reward.registry import resolve

    # a verl compute_score or an OpenRLHF reward_func is served as well, read from its signature
    app = create_app(adapt(resolve(source, **kwargs), None, source), token=token, protocol=protocol)
    import uvicorn

    logger.info("reward server: serving %s on http://%s:%d%s (%s protocol, auth %s)", source, host, port,
                PATHS[protocol], protocol, "on" if token else "off")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
