"""Command line: ``python -m benchmarks run | efficacy | table | ceiling | precision-gain | peer-env | export-speed | rl-peer | gpu``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv=None) -> int:
    from alignment.precision import PRECISIONS
    from benchmarks.efficacy import STUDIES
    from benchmarks.harness import DEFAULT_STEPS, PRESETS, Plan
    from benchmarks.workloads import STAGES

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run stages against their peers, alternating, and print the table")
    run.add_argument("--stage", type=_list, default=list(STAGES), help=f"comma list of {','.join(STAGES)}")
    run.add_argument("--preset", type=_list, default=list(PRESETS), help=f"comma list of {','.join(PRESETS)}")
    run.add_argument("--repeats", type=int, default=3, help="(ours, peer) pairs per stage and preset")
    run.add_argument("--steps", type=int, default=None,
                     help=f"training steps per run (default per stage and preset: {json.dumps(DEFAULT_STEPS)})")
    run.add_argument("--batch", type=int, default=None, help="per-device batch size (default: the recipe's)")
    run.add_argument("--max-samples", type=int, default=2000,
                     help="use the first N rows of each training file on both sides (0: all rows)")
    run.add_argument("--output", default="benchmarks/results/", help="folder for the JSON and Markdown results")
    run.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                     help="extra recipe override for our side only (speed-lever experiments), repeatable")
    run.add_argument("--peer-set", action="append", default=[], metavar="KEY=VALUE",
                     help="extra trainer-config setting for the peer only, repeatable")
    run.add_argument("--child-env", action="append", default=[], metavar="NAME=VALUE",
                     help="environment variable for every run, both sides alike (e.g. OMP_WAIT_POLICY=PASSIVE)")
    run.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                     help="both sides alike: our recipe's precision, the peer's bf16 flag (mixed precision)")
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    run.add_argument("--ceiling-trials", type=int, default=10)
    run.add_argument("--label", default="", help="free text stored in the JSON")
    run.add_argument("--keep-workdir", action="store_true", help="keep the temporary models, run folders and logs")
    table = commands.add_parser("table", help="print one Markdown table from report JSON files "
                                "(a later file's rows replace an earlier one's for the same stage and preset)")
    table.add_argument("reports", nargs="+")
    efficacy = commands.add_parser("efficacy", help="the seed study: a demo pipeline once per seed, one table "
                                   "of every checkpoint's held-out results with min / median / max")
    efficacy.add_argument("--seeds", type=lambda text: [int(s) for s in _list(text)], default=[0, 1, 2, 3, 4])
    efficacy.add_argument("--study", choices=sorted(STUDIES), default="arith",
                          help="arith: recipes/tiny/pipeline.yaml and its claims; tools: the tool demo "
                          "(recipes/tiny/pipeline_tools.yaml, docs/agents.md)")
    efficacy.add_argument("--pipeline", default=None, help="another pipeline file for the study's columns and claims")
    efficacy.add_argument("--precision", choices=PRECISIONS, default=None,
                          help="every stage's precision (default: each recipe's own, auto)")
    efficacy.add_argument("--jobs", type=int, default=1,
                          help="seeds run at a time (each child gets cores / jobs threads)")
    efficacy.add_argument("--isa", choices=["default", "avx2"], default="default",
                          help="avx2: force torch, oneDNN and MKL onto their AVX2 kernels (another CPU's path)")
    efficacy.add_argument("--workdir", default="runs/efficacy", help="each seed's pipeline runs under WORKDIR/<stamp>")
    efficacy.add_argument("--output", default="benchmarks/results/", help="folder for the JSON and Markdown table")
    efficacy.add_argument("--rebuild", metavar="WORKDIR/STAMP-ISA", default=None,
                          help="re-read a finished study's run directories and rewrite its table (no training)")
    commands.add_parser("ceiling", help="measure the fp32 and bf16 matmul ceilings and print them as JSON")
    commands.add_parser("peer-env", help="create (or check) the trl 1.12.0 venv of the PPO peer")
    export_speed = commands.add_parser("export-speed", help="decode speed of the torchao int8 exports vs fp32 "
                                       "(table and ratio; benchmarks/export_speed.py)")
    export_speed.add_argument("--size", choices=["1m", "20m", "110m"], default="110m")
    export_speed.add_argument("--threads", type=int, default=1)
    export_speed.add_argument("--tokens", type=int, default=32, help="new tokens per timed generation")
    export_speed.add_argument("--repeats", type=int, default=5, help="rounds, variants in turns")
    export_speed.add_argument("--schemes", type=_list, default=["dynamic", "weight-only"])
    export_speed.add_argument("--modes", type=_list, default=["eager", "compiled"], help="eager,compiled")
    export_speed.add_argument("--json", help="also write the report as JSON here")
    from benchmarks import rl_peer

    rl_peer.add_arguments(commands.add_parser("rl-peer", help="our loop's GRPO / RLOO vs trl's GRPOTrainer / "
                                              "RLOOTrainer at equal settings (benchmarks/rl_peer.py)"))
    from benchmarks import precision_gain

    precision_gain.add_arguments(commands.add_parser(
        "precision-gain", help="align run at precision=auto vs precision=fp32, alternating: what auto chose and "
        "its samples/s ratio (benchmarks/precision_gain.py)"))
    from benchmarks import gpu

    gpu.add_arguments(commands.add_parser("gpu", help="SFT/DPO/GRPO/PPO of a Qwen2-0.5B shape vs trl on a GPU, <= 10 min "
                                          "(benchmarks/gpu.py; --dry-run-cpu: the same path on the CPU)"))
    args = parser.parse_args(argv)

    if args.command == "gpu":
        return gpu.main_from_args(args.dry_run_cpu, args.output)

    if args.command == "precision-gain":
        return precision_gain.main_from_args(args)
    if args.command == "rl-peer":
        rl_peer.run_benchmark(args.algo, args.preset, args.repeats, rl_peer.settings_from(args), args.model,
                              args.output, args.timeout)
        return 0
    if args.command == "table":
        from benchmarks.harness import merged_table

        print(merged_table(args.reports))
        return 0
    if args.command == "efficacy":
        from benchmarks.efficacy import all_claims_hold, rebuild, run_study

        if args.rebuild:
            return 0 if all_claims_hold(rebuild(Path(args.rebuild), output=args.output)) else 1
        report = run_study(args.seeds, pipeline=args.pipeline, isa=args.isa, workdir=args.workdir,
                           output=args.output, study=args.study, jobs=args.jobs,
                           precision=args.precision)
        return 0 if all_claims_hold(report) else 1
    if args.command == "ceiling":
        from benchmarks.ceiling import measure

        print(json.dumps(measure(), indent=1))
        return 0
    if args.command == "export-speed":
        from benchmarks import export_speed

        return export_speed.main(args)
    if args.command == "peer-env":
        from benchmarks import peer_env

        try:
            print(peer_env.ensure())
        except peer_env.PeerEnvError as exc:
            print(f"peer environment unusable: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(peer_env.versions()))
        return 0
    plan = Plan(stages=args.stage, presets=args.preset, repeats=args.repeats, steps=args.steps, batch=args.batch,
                max_samples=args.max_samples or None,
                output=args.output, ours_set=args.ours_set, peer_set=args.peer_set, timeout=args.timeout,
                ceiling_trials=args.ceiling_trials, keep_workdir=args.keep_workdir, label=args.label,
                child_env=dict(item.split("=", 1) for item in args.child_env), precision=args.precision)
    try:
        report = run_plan(plan)
    except ValueError as exc:
        parser.error(str(exc))
    failed = [r for r in report["runs"] if r.get("status") == "error"]
    return 1 if failed else 0


def run_plan(plan):
    from benchmarks.harness import run

    return run(plan)


if __name__ == "__main__":
    raise SystemExit(main())
