"""`align dashboard [RUNS_DIR]`: serve the dashboard over a runs directory.

    align dashboard                         runs/ on http://127.0.0.1:8050
    align dashboard runs/tiny --port 8051
    DASH_TOKEN=... align dashboard runs --host 0.0.0.0 --token-env DASH_TOKEN

As with `align serve-reward`, a host other than loopback needs ``--token-env`` naming an environment variable
that holds a token; without one the command refuses before it opens a socket.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from alignment.errors import RecipeError

DEFAULT_RUNS_DIR = "runs"
DEFAULT_PORT = 8050

EXAMPLES = """examples:
  align dashboard                                   every run under runs/, on http://127.0.0.1:8050
  align dashboard runs/tiny --port 8051             one pipeline's runs
  DASH_TOKEN=secret align dashboard runs --host 0.0.0.0 --token-env DASH_TOKEN
"""


def dashboard_token(host: str, token_env: str | None) -> str | None:
    """The token to require: refuse a non-loopback host without one, and a --token-env that is not set."""
    from reward.server import exposure_problem

    problem = exposure_problem(host, token_env, "anyone who can reach it could read every run's recipes and "
                                                "completions")
    if problem:
        raise RecipeError(f"dashboard: {problem}")
    return os.environ[token_env] if token_env else None


def cmd_dashboard(args) -> int:
    from alignment.dashboard.app import serve

    token = dashboard_token(args.host, args.token_env)
    root = Path(args.runs_dir)
    if not root.is_dir():
        raise RecipeError(f"dashboard: no runs directory {root} (give the folder stages and pipelines write into, "
                          "e.g. runs/tiny)")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    suffix = "/?token=<the token in $" + args.token_env + ">" if token else "/"
    print(f"dashboard of {root.resolve()} on http://{shown}:{args.port}{suffix}  (Ctrl-C stops it)", flush=True)
    serve(root, host=args.host, port=args.port, token=token)
    return 0


def add_command(commands) -> None:
    from reward.server import add_bind_arguments

    parser = commands.add_parser(
        "dashboard", help="a local web page over a runs directory: states, live curves, reports, side by side",
        description="Serve a web page listing the runs and pipelines under RUNS_DIR with their state (running, "
        "resumable, finished, failed), their training curves (live, from metrics.jsonl), their evaluation reports "
        "and checkpoints' completions side by side. Read-only. docs/dashboard.md.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs_dir", nargs="?", default=DEFAULT_RUNS_DIR, metavar="RUNS_DIR",
                        help=f"folder holding run directories and pipelines (default {DEFAULT_RUNS_DIR})")
    add_bind_arguments(parser, DEFAULT_PORT, "environment variable holding the token a browser must present (the "
                       "printed URL's ?token=, then a cookie) or a client as Authorization: Bearer")
    parser.set_defaults(func=cmd_dashboard)
