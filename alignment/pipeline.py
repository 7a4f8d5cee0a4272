"""`align pipeline`: run stage recipes in order, wiring each stage's output into the next.

    # align pipeline recipes/tiny/pipeline.yaml
    output_root: runs/tiny
    stages:
      - {name: sft, recipe: recipes/tiny/sft.yaml}
      - {name: dpo, recipe: recipes/tiny/dpo.yaml, inputs: {model.name_or_path: sft}}
    evaluate: {checkpoints: [sft, dpo], baseline: sft, reference: sft}

A top-level ``seed: N`` (or ``align pipeline P seed=N``) sets every stage's seed.
`inputs` maps a recipe key (dotted; list items by index, e.g. ``reward.0.source``)
to the name of an earlier stage, whose output directory is put there.  Each
stage writes to ``<output_root>/<name>``.

A stage is skipped when its directory is complete and its fingerprint (the
resolved recipe, the contents of its data and reward code files, and the
run_info of every stage it reads) is unchanged; an interrupted stage with the
same fingerprint resumes from its last checkpoint; a changed fingerprint or
``--force STAGE`` trains that stage from the start (replacing its directory),
and so every stage after it that reads it.  A stage stopped by a signal stops
the pipeline with exit status 75 (resumable: run the same command again).
The whole pipeline (every recipe, every wiring, tokenizer and chat-template
identity) is validated before anything trains.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment import recipe as recipes
from alignment.checkpoint import RUN_INFO, is_complete, latest_checkpoint, read_json, write_json
from alignment.errors import RecipeError
from alignment.guards import Interrupted

DEFAULT_PIPELINE = "recipes/tiny/pipeline.yaml"
STATE_FILE = "pipeline_state.json"


@dataclass(frozen=True)
class StageEntry:
    name: str
    recipe: str
    inputs: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)


@dataclass(frozen=True)
class EvaluateEntry:
    checkpoints: list
    baseline: str | None = None
    reference: str | None = None
    spec: str | None = None
    output: str | None = None


@dataclass(frozen=True)
class Pipeline:
    path: str
    output_root: str
    stages: list
    evaluate: EvaluateEntry | None = None
    seed: int | None = None  # when set, every stage's `seed` (a seed study runs the same pipeline per seed)
    precision: str | None = None  # when set, every stage's `precision` (auto | fp32 | bf16 | fp16)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read and check a pipeline file (structure and wiring; each stage recipe is checked by `plan`)."""
    data, locations = recipes.read_yaml(path)
    data = recipes.apply_overrides(data, list(overrides or []), locations)
    recipes.check_unknown_keys(data, ["output_root", "stages", "evaluate", "seed", "precision"], (), locations,
                              "the pipeline")
    raw_stages = recipes.coerce(data.get("stages"), list, ("stages",), locations)
    stages, seen = [], set()
    for index, raw in enumerate(raw_stages):
        entry = recipes.coerce(raw, StageEntry, ("stages", index), locations)
        if entry.name in seen:
            raise locations.error(("stages", index, "name"), f"stage name {entry.name!r} is used twice")
        for key, source in entry.inputs.items():
            if source not in seen:
                raise locations.error(("stages", index, "inputs", key),
                                      f"input {source!r} is not an earlier stage (earlier: {sorted(seen) or 'none'})")
        seen.add(entry.name)
        stages.append(entry)
    evaluate = None
    if data.get("evaluate") is not None:
        evaluate = recipes.coerce(data["evaluate"], EvaluateEntry, ("evaluate",), locations)
        for name in list(evaluate.checkpoints) + [evaluate.baseline, evaluate.reference]:
            if name is not None and name not in seen:
                raise locations.error(("evaluate",), f"{name!r} is not a stage of this pipeline")
    output_root = recipes.coerce(data.get("output_root", "runs/pipeline"), str, ("output_root",), locations)
    seed = None if data.get("seed") is None else recipes.coerce(data["seed"], int, ("seed",), locations)
    precision = None
    if data.get("precision") is not None:
        from alignment.precision import PRECISIONS

        precision = recipes.coerce(data["precision"], Literal[PRECISIONS], ("precision",), locations)
    return Pipeline(path=str(path), output_root=output_root, stages=stages, evaluate=evaluate, seed=seed,
                    precision=precision)


def set_path(data: dict, dotted: str, value) -> None:
    """Set a dotted key in a raw recipe dict; integer parts index into lists (``reward.0.source``)."""
    parts = dotted.split(".")
    target = data
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


def stage_output(pipeline: Pipeline, name: str) -> Path:
    return Path(pipeline.output_root) / name


def resolve_stage(pipeline: Pipeline, entry: StageEntry) -> recipes.Recipe:
    """The stage's recipe with its overrides, its wired inputs and its output directory applied."""
    data, locations = recipes.read_yaml(entry.recipe)
    if pipeline.seed is not None:  # before the stage's own overrides: an entry that names its seed keeps it
        data["seed"] = pipeline.seed
    if pipeline.precision is not None:  # likewise: the whole pipeline in one arithmetic (a seed study per precision)
        data["precision"] = pipeline.precision
    data = recipes.apply_overrides(data, list(entry.overrides), locations)
    for key, source in entry.inputs.items():
        try:
            set_path(data, key, str(stage_output(pipeline, source)))
        except (IndexError, ValueError, KeyError, TypeError):
            raise RecipeError(f"{pipeline.path}: stage {entry.name}: input key {key!r} does not exist in "
                              f"{entry.recipe}") from None
    data["output_dir"] = str(stage_output(pipeline, entry.name))
    return recipes.from_dict(data, locations)


def code_files(recipe: recipes.Recipe) -> list[str]:
    """The Python files of the recipe's reward sources (``file.py:fn`` and ``package.module:fn``)."""
    import importlib.util

    files = []
    for spec in recipe.reward:
        target, _, function = str(spec["source"]).rpartition(":")
        if not function or target.startswith(("http://", "https://")) or not target:
            continue  # a registered name, a reward-model directory or a URL: no code file of the user's
        if target.endswith(".py"):
            files.append(target)
            continue
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and found.origin.endswith(".py"):
            files.append(found.origin)
    return files


def fingerprint(recipe: recipes.Recipe, entry: StageEntry, pipeline: Pipeline) -> str:
    """Hash of what decides a stage's result: its resolved recipe, the contents of its data files and reward
    code files (an edited file keeps its name: the recipe alone would not change), and the run_info of every
    input."""
    from alignment.data import data_fingerprint
    from alignment.stages.common import data_files

    digest = hashlib.sha256(recipe.resolved_yaml().encode("utf-8"))
    for path in data_files(recipe) + code_files(recipe):
        digest.update(f"{path}={data_fingerprint(path)}".encode())
    for source in sorted(set(entry.inputs.values())):
        info = stage_output(pipeline, source) / RUN_INFO
        digest.update(source.encode() + (info.read_bytes() if info.is_file() else b"<not run>"))
    return digest.hexdigest()


def check_tokenizers(pipeline: Pipeline, planned: list) -> None:
    """Every stage that starts from outside the pipeline must share one tokenizer and chat template."""
    from alignment.checkpoint import tokenizer_hashes
    from policies import load_tokenizer

    starting = [(entry, recipe) for entry, recipe in planned if "model.name_or_path" not in entry.inputs]
    if len(starting) < 2:
        return  # one starting model (the others inherit its tokenizer): nothing to compare, nothing to load
    seen: dict[tuple, str] = {}
    for entry, recipe in starting:
        spec = recipe.model.name_or_path
        hashes = tokenizer_hashes(load_tokenizer(spec, trust_remote_code=recipe.model.trust_remote_code))
        key = (hashes["tokenizer"], hashes["chat_template"])
        if seen and key not in seen:
            other = next(iter(seen.values()))
            raise RecipeError(f"{pipeline.path}: stage {entry.name} starts from {spec}, whose tokenizer or chat "
                              f"template differs from that of stage {other}; one pipeline uses one tokenizer")
        seen.setdefault(key, entry.name)


def plan(pipeline: Pipeline) -> list:
    """Validate every stage recipe and the tokenizers, before anything trains."""
    planned = [(entry, resolve_stage(pipeline, entry)) for entry in pipeline.stages]
    check_tokenizers(pipeline, planned)
    return planned


def run_pipeline(pipeline: Pipeline, force: list[str] | None = None) -> dict:
    """Run (or skip, or resume) each stage in order, then evaluate; return the per-stage summaries."""
    from alignment.stages import stage_spec

    started = time.time()
    plan(pipeline)
    root = Path(pipeline.output_root)
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / STATE_FILE
    state = read_json(state_path) if state_path.is_file() else {}
    results = {}
    total = len(pipeline.stages)
    for number, entry in enumerate(pipeline.stages, start=1):
        recipe = resolve_stage(pipeline, entry)  # again: inputs that just ran have a new run_info
        print_header(number, total, entry, recipe)
        mark = fingerprint(recipe, entry, pipeline)
        previous = state.get(entry.name, {})
        out = stage_output(pipeline, entry.name)
        unchanged, forced = previous.get("fingerprint") == mark, entry.name in (force or [])
        if unchanged and not forced and is_complete(out):
            print(f"      finished earlier with the same recipe and inputs: skipped ({out})")
            results[entry.name] = {"skipped": True, "output_dir": str(out)}
            continue
        if unchanged and not forced and latest_checkpoint(out) is not None:
            print(f"      resuming from {latest_checkpoint(out)}")
            how = "resume=true"
        else:  # changed, forced or new: train from the start; the stage's directory is the pipeline's to replace
            how = "overwrite=true"
        recipe = resolve_stage(pipeline, StageEntry(entry.name, entry.recipe, entry.inputs,
                                                    list(entry.overrides) + [how]))
        state[entry.name] = {"fingerprint": mark, "status": "running"}
        write_json(state_path, state)
        try:
            result = stage_spec(recipe.stage).load_module().run(recipe)
        except Interrupted:
            # resumable: the next `align pipeline` resumes this stage (same fingerprint, a checkpoint)
            state[entry.name]["status"] = "interrupted"
            write_json(state_path, state)
            raise
        state[entry.name]["status"] = "done"
        write_json(state_path, state)
        print(f"      {result.get('summary', 'done')}")
        results[entry.name] = result
    results["_evaluation"] = evaluate_pipeline(pipeline)
    print(f"pipeline finished in {time.time() - started:.0f}s; runs under {root}")
    return results


def print_header(number: int, total: int, entry: StageEntry, recipe) -> None:
    print(f"\n[{number}/{total}] {entry.name}: stage {recipe.stage}, from {recipe.model.name_or_path} "
          f"-> {recipe.output_dir}", flush=True)


def evaluate_pipeline(pipeline: Pipeline) -> dict | None:
    """Compare the listed checkpoints with `align eval` and print its table."""
    if pipeline.evaluate is None:
        return None
    from alignment.evaluation.runner import evaluate_checkpoints

    spec = pipeline.evaluate
    out = Path(spec.output or Path(pipeline.output_root) / "eval")
    checkpoints = {name: str(stage_output(pipeline, name)) for name in spec.checkpoints}
    report = evaluate_checkpoints(checkpoints, spec_path=spec.spec, output_dir=out, baseline=spec.baseline,
                                  reference=spec.reference)
    return {"report_dir": str(out), **({"table": report.get("table")} if isinstance(report, dict) else {})}


def cmd_pipeline(args) -> int:
    pipeline = load_pipeline(args.pipeline, args.overrides)
    results = run_pipeline(pipeline, force=args.force)
    evaluation = results.get("_evaluation") or {}
    if evaluation.get("table"):
        print("\n" + evaluation["table"])
    if evaluation.get("report_dir"):
        print(f"report: {evaluation['report_dir']}/report.md")
    return 0


def add_command(commands) -> None:
    parser = commands.add_parser(
        "pipeline", help="run a pipeline of stages (default: the offline tiny demo)",
        description="Run every stage of a pipeline recipe in order, skipping finished stages and resuming "
        "interrupted ones, then evaluate the checkpoints side by side.",
    )
    parser.add_argument("pipeline", nargs="?", default=DEFAULT_PIPELINE, help=f"pipeline YAML (default {DEFAULT_PIPELINE})")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the pipeline file")
    parser.add_argument("--force", nargs="*", default=[], metavar="STAGE",
                        help="train these stages again from the start, even if finished")
    parser.set_defaults(func=cmd_pipeline)
