"""The `align` command line.

    align run recipes/tiny/sft.yaml                       # run one stage
    align run recipes/tiny/sft.yaml train.max_steps=50    # key.sub=value overrides
    align run recipes/tiny/sft.yaml --resume              # continue from the last checkpoint
    align validate recipes/                               # check every recipe, load no model

Exit status: 0 done; 2 an error (one `error: ...` line); 75 interrupted by a signal after saving a
checkpoint (resumable with --resume); 130 Ctrl-C before anything could be saved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from alignment.errors import AlignmentError

EXAMPLES = """examples:
  align run recipes/tiny/sft.yaml                      run the SFT stage of the offline demo
  align run recipes/tiny/sft.yaml output_dir=/tmp/sft  override any key as key.sub=value
  align run recipes/tiny/sft.yaml --resume             resume from the run's last checkpoint
  align run recipes/tiny/sft.yaml --overwrite          train again into a directory holding a finished run
  align validate recipes/                              check every recipe under a folder
"""


def cmd_run(args) -> int:
    from alignment import recipe as recipes
    from alignment.stages import stage_spec

    overrides = list(args.overrides) + (["resume=true"] if args.resume else []) + \
        (["overwrite=true"] if args.overwrite else [])
    recipe = recipes.load(args.recipe, overrides)
    result = stage_spec(recipe.stage).load_module().run(recipe)
    from alignment.distributed import is_main_process

    if is_main_process():  # under torchrun / accelerate launch every process returns here: one summary
        print(result.get("summary") or json.dumps(result, indent=2, default=str))
    return 0


def validate_accelerate_config(data: dict, locations) -> str:
    """Keys and distributed type of an `accelerate launch --config_file` YAML."""
    import dataclasses

    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    from alignment import recipe as recipes

    fields = [f.name for f in dataclasses.fields(ClusterConfig)]
    recipes.check_unknown_keys(data, fields, (), locations, "the accelerate config")
    kinds = [k.value for k in DistributedType]
    if data.get("distributed_type") not in kinds:
        raise locations.error(("distributed_type",), f"must be one of {kinds}")
    return f"accelerate config ({data['distributed_type']})"


def validate_file(path: Path) -> str:
    """Validate one YAML file; return a one-line description of what it is."""
    from alignment import recipe as recipes
    from alignment.data import LOCAL_SUFFIXES
    from alignment.errors import RecipeError

    data, locations = recipes.read_yaml(path)
    first_line = path.read_text(encoding="utf-8").splitlines()[:1]
    if "compute_environment" in data or "distributed_type" in data:
        return validate_accelerate_config(data, locations)
    if not first_line or not first_line[0].startswith("#") or "align " not in first_line[0]:
        raise RecipeError(f"{path}:1: a recipe starts with a comment giving the command that runs it, "
                          f"e.g. '# align run {path}'")
    if "stages" in data:
        from alignment.pipeline import load_pipeline, plan

        pipeline = load_pipeline(path)
        plan(pipeline)
        return f"pipeline of {len(pipeline.stages)} stages"
    if "stage" not in data and "data" in data and not isinstance(data.get("data"), dict):
        spec = recipes.coerce(data, recipes.EvalSpec, (), locations)
        if spec.data and Path(spec.data).suffix in LOCAL_SUFFIXES and not Path(spec.data).is_file():
            raise locations.error(("data",), f"no such data file {spec.data!r}")
        return "eval spec"
    recipe = recipes.from_dict(data, locations)
    for keys, value in [(("data", "train"), recipe.data.train), (("data", "eval"), recipe.data.eval),
                        (("eval", "data"), recipe.eval.data if recipe.eval else None)]:
        if value and Path(value).suffix in LOCAL_SUFFIXES and not Path(value).is_file():
            raise locations.error(keys, f"no such data file {value!r} (paths are relative to the current folder)")
    build_trainer_config(recipe)
    return f"stage {recipe.stage}"


def build_trainer_config(recipe) -> None:
    """Build the trainer config the run would build (trl's, from the stage's own defaults), loading no model:
    what trl refuses in the settings is refused here, not at the first step."""
    from alignment.stages import stage_spec

    build = getattr(stage_spec(recipe.stage).load_module(), "trainer_config", None)
    if build is not None:
        build(recipe, Path(recipe.output_dir))


def cmd_validate(args) -> int:
    from alignment.recipe import recipe_files

    files = recipe_files(args.paths)
    if not files:
        print("no recipe files found", file=sys.stderr)
        return 2
    failures = 0
    for path in files:
        try:
            print(f"ok    {path}  ({validate_file(path)})")
        except AlignmentError as exc:
            failures += 1
            print(f"FAIL  {exc}")
    print(f"{len(files) - failures} of {len(files)} recipes valid")
    return 1 if failures else 0


def build_parser(extra_commands=()) -> argparse.ArgumentParser:
    """The `align` parser: run and validate, then each of `extra_commands` (functions(subparsers))."""
    parser = argparse.ArgumentParser(
        prog="align",
        description="Align causal language models: SFT, reward models, PPO/GRPO/RLOO, DPO and relatives, "
        "evaluation. Every stage runs from a YAML recipe.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run one stage from a recipe", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", help="path to the stage's YAML recipe")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides (values parsed as YAML)")
    run.add_argument("--resume", action="store_true", help="continue from the run's last complete checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="start fresh in an output_dir that holds a finished run (refused without it)")
    run.set_defaults(func=cmd_run)

    validate = commands.add_parser("validate", help="check recipes without loading any model")
    validate.add_argument("paths", nargs="+", help="recipe files or folders (every *.yaml under them)")
    validate.set_defaults(func=cmd_validate)

    for extra in extra_commands:
        extra(commands)
    return parser


def extra_commands() -> list:
    """The commands other modules contribute (each module's add_command), in help order; a module that is
    not there (a trimmed install) contributes none."""
    import importlib

    found = []
    for module_name in ("alignment.pipeline", "alignment.evaluation.runner", "reward.cli", "alignment.tools",
                        "alignment.dashboard.cli"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        found.append(module.add_command)
    return found


def busy_machine() -> bool:
    """Whether more work is queued than there are cores (1-minute load average), e.g. a shared CI box."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def set_openmp_wait_policy() -> None:
    """OMP_WAIT_POLICY=PASSIVE on a busy machine, unless the user chose a policy.

    Idle OpenMP threads then sleep instead of spinning: on a busy or shared CPU
    spinning threads steal the cores the work needs (measured up to 20x slower
    steps).  On a quiet machine spinning is the faster choice (SFT on the 20m
    preset: ~1,100-1,200 tokens/s with libgomp's default against ~1,000 passive),
    so the default is left alone there.  benchmarks/README.md has both measurements.
    """
    if "OMP_WAIT_POLICY" not in os.environ and busy_machine():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    # Set before torch is imported, which happens below.
    set_openmp_wait_policy()
    parser = build_parser(extra_commands())
    args, extra = parser.parse_known_args(argv)
    # `align run R --resume key=value`: overrides after an option land in `extra`
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if overrides and hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from alignment.guards import EXIT_INTERRUPTED, Interrupted
    from alignment.recipe import install_log_redaction, redact_text

    install_log_redaction()
    try:
        return args.func(args)
    except Interrupted as exc:
        print(f"interrupted (resumable, exit {EXIT_INTERRUPTED}): {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except AlignmentError as exc:  # messages may quote a URL or a value: scrubbed by value, not only by key
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
