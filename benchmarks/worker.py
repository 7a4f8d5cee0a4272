"""One benchmark run in a fresh process: one side of one stage; writes its record as JSON.

    python -m benchmarks.worker --stage sft --side ours --assets-json A.json --steps 20 \
        --workdir /tmp/x --result /tmp/x/result.json

The harness starts one of these per run (ours, peer, ours, peer, ...), so the
peak resident memory in the record belongs to that run alone.  The PPO peer
has its own entry point, :mod:`benchmarks.ppo_peer` (another virtual environment).
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="run one side of one benchmark stage")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--side", choices=("ours", "peer"), required=True)
    parser.add_argument("--assets-json", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--logging-steps", type=int, default=None)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--ours-set", action="append", default=[])
    parser.add_argument("--peer-set", action="append", default=[])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)

    from benchmarks import workloads
    from benchmarks.measure import write_result

    spec = workloads.Spec(
        stage=args.stage, side=args.side, assets=json.loads(Path(args.assets_json).read_text()),
        steps=args.steps, workdir=args.workdir, batch=args.batch, logging_steps=args.logging_steps,
        max_samples=args.max_samples,
        ours_set=tuple(args.ours_set), peer_set=tuple(args.peer_set), precision=args.precision,
    )
    try:
        result = workloads.run(spec)
        result["status"] = "ok"
    except workloads.Pending as exc:
        result = {"status": "pending", "error": str(exc)}
    except Exception as exc:
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    write_result(args.result, result)
    return 0 if result["status"] in ("ok", "pending") else 1


if __name__ == "__main__":
    raise SystemExit(main())
