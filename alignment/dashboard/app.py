"""The dashboard's web app: a JSON API over a runs directory and one static page that draws it.

    app = create_app("runs/tiny")                       # loopback: no token
    app = create_app("runs", token="s3cret")            # anything else: every request needs the token

Routes (all GET; nothing here writes into the runs directory):

    /                       the page (static/index.html, static/app.js; charts by uPlot, vendored in static/)
    /api/overview           runs, pipelines and evaluation reports with their states (runs.scan)
    /api/run?path=P&since=N a run's state and its metrics.jsonl records from record N on (the page polls this)
    /api/completions?path=P the sampled completions a run logged, by training step
    /api/report?path=P      an evaluation's report.json (the side-by-side view reads its samples)
    /report?path=P          that report as HTML, plots embedded (alignment.evaluation.report.render_html)

With a token, a request carries it as ``Authorization: Bearer <token>``, as the ``align_dashboard`` cookie, or
once as ``?token=`` (the URL `align dashboard` prints), which sets the cookie.  On loopback, requests whose Host
header is not a loopback name are refused, so a web page elsewhere cannot reach the dashboard through DNS
rebinding.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from alignment.dashboard import runs

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "align_dashboard"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]

# (panel title, keys in order of preference: each run draws the first one it logs). The shared names of
# alignment.metrics come first; then what each trainer logs under its own name.
PANELS = [
    ("Reward", ["reward/total", "objective/score", "reward", "rewards/margins"]),
    ("KL to reference (per sequence)", ["kl/per_sequence", "objective/kl", "kl_to_start/k1"]),
    ("Loss", ["loss", "policy/loss", "train/loss"]),
    ("Held-out accuracy", ["eval/greedy_accuracy", "eval/accuracy", "heldout/preference_accuracy",
                           "heldout/accuracy"]),
]
# the page's own policy: its scripts and styles only, pictures inline (the report's plots); nothing from outside
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "frame-ancestors 'self'; form-action 'none'")


def host_name(header: str) -> str:
    """The name in a Host header, without its port ("127.0.0.1:8050" -> "127.0.0.1", "[::1]:80" -> "[::1]")."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


def create_app(runs_dir: str | Path, token: str | None = None, loopback: bool = True):
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
    from fastapi.staticfiles import StaticFiles

    root = Path(runs_dir).resolve()
    app = FastAPI(title="align dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    expected = token.encode() if token else None

    def authorised(request: Request) -> bool:
        if expected is None:
            return True
        header = request.headers.get("authorization", "")
        candidates = [header[len("Bearer "):] if header.startswith("Bearer ") else "",
                      request.cookies.get(COOKIE, ""), request.query_params.get("token", "")]
        return any(hmac.compare_digest(c.encode(), expected) for c in candidates if c)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = host_name(request.headers.get("host") or "")
        if loopback and host not in LOOPBACK_HOSTS:
            return PlainTextResponse(f"the dashboard answers on 127.0.0.1 only, not {host!r}", status_code=421)
        if not authorised(request):
            return PlainTextResponse("missing or wrong token: open the URL `align dashboard` printed",
                                     status_code=401, headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        given = request.query_params.get("token")
        if expected is not None and given and hmac.compare_digest(given.encode(), expected):
            response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"  # a live view: always the files as they are now
        return response

    def inside(path: str) -> Path:
        try:
            found = runs.resolve_inside(root, path)
        except ValueError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        if not found.is_dir():
            raise HTTPException(status_code=404, detail=f"no folder {path!r} under {root}")
        return found

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/overview")
    def overview():
        return JSONResponse({**runs.scan(root), "panels": [{"title": t, "keys": k} for t, k in PANELS]})

    @app.get("/api/run")
    def run(path: str = Query(...), since: int = Query(0, ge=0)):
        run_dir = inside(path)
        records = runs.read_jsonl(run_dir / runs.METRICS_FILE)
        return {"run": runs.describe_run(run_dir, root, pipeline_status(run_dir)), "count": len(records),
                "records": records[since:], "panels": [{"title": t, "keys": k} for t, k in PANELS]}

    def pipeline_status(run_dir: Path) -> str | None:
        state = runs.read_json_or_none(run_dir.parent / runs.STATE_FILE) or {}
        entry = state.get(run_dir.name)
        return entry.get("status") if isinstance(entry, dict) else None

    @app.get("/api/completions")
    def completions(path: str = Query(...)):
        return runs.completions(inside(path))

    def report_json(path: str) -> tuple[Path, dict]:
        folder = inside(path)
        data = runs.read_json_or_none(folder / runs.REPORT_FILE)
        if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), dict):
            raise HTTPException(status_code=404, detail=f"no readable {runs.REPORT_FILE} in {path!r}")
        return folder, data

    @app.get("/api/report")
    def report(path: str = Query(...)):
        _, data = report_json(path)
        checkpoints = {name: {"path": entry.get("path"), "samples": entry.get("samples") or []}
                       for name, entry in data["checkpoints"].items()}
        return {"path": path, "title": data.get("title"), "created": data.get("created"),
                "baseline": data.get("baseline"), "checkpoints": checkpoints}

    @app.get("/report")
    def report_page(path: str = Query(...)):
        from alignment.errors import DataError
        from alignment.evaluation.report import render_html

        folder, data = report_json(path)
        try:
            return HTMLResponse(render_html(data, folder))
        except DataError as exc:
            raise HTTPException(status_code=422, detail=f"{path}/{runs.REPORT_FILE}: {exc}") from None

    return app


def serve(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 8050, token: str | None = None,
          log_level: str = "warning") -> None:
    import uvicorn

    from reward.server import is_loopback

    uvicorn.run(create_app(runs_dir, token=token, loopback=is_loopback(host)), host=host, port=port,
                log_level=log_level)
