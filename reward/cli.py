"""`align serve-reward`: serve any reward source over HTTP (the protocol in docs/rewards.md).

    align serve-reward runs/tiny/reward_model                       # loopback, no token
    align serve-reward examples/rewards/brevity.py:brevity --port 8001
    REWARD_TOKEN=... align serve-reward runs/tiny/reward_model --host 0.0.0.0 --token-env REWARD_TOKEN

A host other than loopback (127.0.0.0/8, ::1, localhost) needs ``--token-env``
naming an environment variable that holds a bearer token; without one the
command refuses before loading the source or opening a socket.
"""

from __future__ import annotations

import argparse

from reward.errors import RewardError
from reward.protocols import PROTOCOLS

EXAMPLES = """examples:
  align serve-reward runs/tiny/reward_model                 a trained reward model, on 127.0.0.1:8000
  align serve-reward examples/rewards/brevity.py:brevity    a Python function
  align serve-reward answer_match --protocol openrlhf       for OpenRLHF's --remote_rm_url http://127.0.0.1:8000/get_reward
  REWARD_TOKEN=secret align serve-reward runs/tiny/reward_model --host 0.0.0.0 --token-env REWARD_TOKEN
"""


def check_exposure(host: str, token_env: str | None) -> None:
    """Refuse a non-loopback host unless `token_env` names a set environment variable (the token)."""
    from reward.server import exposure_problem

    problem = exposure_problem(host, token_env, "anyone who can reach it could call the scorer")
    if problem:
        raise RewardError(f"serve-reward: {problem}")


def cmd_serve_reward(args) -> int:
    from reward.server import serve

    check_exposure(args.host, args.token_env)
    serve(args.source, host=args.host, port=args.port, token_env=args.token_env, protocol=args.protocol)
    return 0


def add_command(commands) -> None:
    parser = commands.add_parser(
        "serve-reward", help="serve a reward source over HTTP (POST /score, GET /health)",
        description="Serve any reward source (a registered name, module:function, file.py:function, a "
        "reward-model directory or a URL) with the reference HTTP server, for trainers on other machines "
        "or processes. Protocol: docs/rewards.md.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from reward.server import add_bind_arguments

    parser.add_argument("source", metavar="SOURCE", help="reward source string, e.g. runs/tiny/reward_model")
    add_bind_arguments(parser, 8000, "environment variable holding the bearer token clients must send")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="align",
                        help="align: POST /score (ours); openrlhf: POST /get_reward (OpenRLHF's remote RM); "
                        "llamafactory: POST /v1/score/evaluation (LLaMA-Factory's reward_model_type: api)")
    parser.set_defaults(func=cmd_serve_reward)
