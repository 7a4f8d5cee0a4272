"""`align eval`: compare checkpoints side by side on held-out prompts.

    align eval runs/tiny/sft runs/tiny/dpo runs/tiny/ppo --output runs/tiny/eval
    align eval runs/tiny/sft runs/tiny/dpo --spec recipes/tiny/eval.yaml --baseline sft

For each policy checkpoint: greedy and sampled completions (seeded), each
reward source's mean and spread, verifiable accuracy, win rate against the
baseline with a bootstrap 95% CI (ties counted), KL to the reference estimated
on the sampled completions, perplexity of the reference completions, BLEU and
ROUGE against them, length, distinct-n and EOS rate.  A reward-model
checkpoint gets its held-out preference accuracy instead.  Writes
report.json, report.md and PNG plots.  `--lm-eval TASKS` adds
lm-evaluation-harness scores when the optional `lm_eval` package is installed
(see lm_harness.py); without it the report says skipped and why.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from alignment import recipe as recipes
from alignment.checkpoint import RUN_INFO, package_versions, read_json
from alignment.errors import AlignmentError, RecipeError
from alignment.evaluation import load_metric, stats
from alignment.evaluation.generate import completion_nll, generate_completions, sequence_logprobs
from alignment.evaluation.quick import eval_columns


def load_spec(spec_path: str | None, checkpoints: dict[str, str]) -> recipes.EvalSpec:
    """The eval spec: a file (bare spec, or a recipe's `eval:` section), else the first checkpoint's recipe."""
    if spec_path:
        data, locations = recipes.read_yaml(spec_path)
        keys = ("eval",) if "eval" in data else ()
        body = data["eval"] if keys else data
        return recipes.coerce(body, recipes.EvalSpec, keys, locations)
    for path in checkpoints.values():
        saved = Path(path) / "recipe.yaml"
        if saved.is_file():
            data, locations = recipes.read_yaml(saved)
            if data.get("eval"):
                return recipes.coerce(data["eval"], recipes.EvalSpec, ("eval",), locations)
    raise RecipeError("no eval spec: pass --spec EVAL.yaml (or evaluate checkpoints whose recipe has an eval: section)")


def is_reward_model(path: str) -> bool:
    info = Path(path) / RUN_INFO
    if info.is_file() and read_json(info).get("stage") == "reward_model":
        return True
    config = Path(path) / "config.json"
    return config.is_file() and any(a.endswith("ForSequenceClassification")
                                    for a in read_json(config).get("architectures") or [])


def reward_model_metrics(path: str, spec) -> dict:
    """Held-out preference accuracy: the share of pairs where score(chosen) > score(rejected)."""
    from alignment.data import load_rows
    from reward.model import RewardModel

    if not spec.preference_data:
        return {}
    rows, _ = load_rows(spec.preference_data, "preference", max_samples=spec.max_samples)
    scorer = RewardModel(path)
    prompts = [row.get("prompt", "") for row in rows]
    chosen = scorer(prompts, [row["chosen"] for row in rows])
    rejected = scorer(prompts, [row["rejected"] for row in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "reward_margin": sum(margins) / len(margins)}


def completion_text(value) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


def score(reward, prompts, samples: list[dict], columns):
    """The recipe's reward sources on the samples' texts (and their token ids, trl's ``completion_ids``):
    the combined result (scores per source, failures per source)."""
    return reward(prompts, [s["text"] for s in samples], completion_ids=[s["token_ids"] for s in samples],
                  **columns)


def sample_metrics(prefix: str, samples: list[dict], result) -> dict:
    """Reward means, accuracy and EOS rate of one set of samples.

    A sample whose score *failed* (not "does not apply") is left out of a mean and of the accuracy's
    denominator, and says so: ``<prefix>_reward_failures`` counts them per source, and the accuracy comes
    with ``<prefix>_accuracy_scored`` / ``<prefix>_accuracy_failed``.
    """
    per_source = result.per_source
    rewards = {name: stats.mean_std(values) for name, values in per_source.items()}
    metrics = {"reward" if prefix == "greedy" else f"{prefix}_reward": rewards}
    failures = {name: len(indices) for name, indices in result.failed.items() if indices}
    if failures:
        metrics[f"{prefix}_reward_failures"] = failures
        print(f"warning: {prefix} samples whose reward failed (left out of the means, never scored 0): "
              + ", ".join(f"{name} {n}" for name, n in failures.items()), flush=True)
    if "answer_match" in per_source:
        applied = [v for v in per_source["answer_match"] if v is not None]
        metrics[f"{prefix}_accuracy"] = sum(applied) / len(applied) if applied else None
        metrics[f"{prefix}_accuracy_scored"] = len(applied)
        metrics[f"{prefix}_accuracy_failed"] = failures.get("answer_match", 0)
    metrics[f"{prefix}_eos_rate"] = sum(s["ended_with_eos"] for s in samples) / len(samples)
    return metrics


def text_metrics(texts: list[str], references: list[str]) -> dict:
    bleu = load_metric("bleu").compute(predictions=texts, references=references)
    rouge = load_metric("rouge").compute(predictions=texts, references=references)
    out = {"bleu": bleu.get("bleu", bleu.get("score"))}
    out.update({k: v for k, v in rouge.items() if k.startswith("rouge")})
    return out


def evaluate_policy_checkpoint(path: str, spec, rows: list[dict], reward) -> dict:
    """Everything measured on one policy: samples, scores and metrics (KL and win rate come later).

    Out of memory is a TrainingError naming the batch size and generation length to lower.
    """
    from alignment.guards import is_out_of_memory, out_of_memory_error

    try:
        return _evaluate_policy_checkpoint(path, spec, rows, reward)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_error(f"evaluating {path}", {"batch_size": spec.batch_size,
                                                          "max_new_tokens": spec.max_new_tokens},
                                  "Lower the eval spec's batch_size (or max_new_tokens)", exc) from exc


def checkpoint_environment(path: str):
    """The `environment:` of the recipe a checkpoint was trained with (its recipe.yaml), or None."""
    saved = Path(path) / "recipe.yaml"
    if not saved.is_file():
        return None
    data, locations = recipes.read_yaml(saved)
    if not data.get("environment"):
        return None
    from alignment.envs import EnvironmentSpec

    return recipes.coerce(data["environment"], EnvironmentSpec, ("environment",), locations)


def evaluate_episode_checkpoint(path: str, spec, environment, model, tokenizer) -> dict:
    """A checkpoint trained in an environment, measured in it: greedy episodes, and sampled ones with
    ``spec.sampled`` (alignment.evaluation.episodes).

    Accuracy, reward, tool-call and malformed-call rates, turns, accuracy with and without a call, the
    `by_<column>` splits, and the greedy episodes as the report's samples (no KL to the reference).
    """
    from alignment.evaluation.episodes import evaluate_in_environment

    rows, episodes, result, metrics = evaluate_in_environment(model, tokenizer, environment, spec)
    metrics["environment"] = environment.source
    correct = result.per_source.get("answer_match", [None] * len(rows))
    samples = [{"prompt": e.prompt[-1]["content"], "reference": r.get("answer"),
                "completion": tokenizer.decode(e.completion_ids, skip_special_tokens=False),
                "correct": (bool(c) if c is not None else None)}
               for r, e, c in zip(rows, episodes, correct)]
    return {"path": path, "metrics": metrics, "samples": samples, "scores": result.per_source,
            "_model": model, "_tokenizer": tokenizer}


def _evaluate_policy_checkpoint(path: str, spec, rows: list[dict], reward) -> dict:
    import policies
    from alignment.checkpoint import require_finished_run

    require_finished_run(path)
    model, tokenizer = policies.load(path)
    environment = checkpoint_environment(path) or spec.environment
    if environment is not None:
        return evaluate_episode_checkpoint(path, spec, environment, model, tokenizer)
    prompts = [row["prompt"] for row in rows]
    columns = eval_columns(rows)
    greedy = generate_completions(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                                  batch_size=spec.batch_size, do_sample=False, seed=spec.seed)
    greedy_texts = [s["text"] for s in greedy]
    greedy_result = score(reward, prompts, greedy, columns)
    greedy_scores = greedy_result.per_source
    metrics = sample_metrics("greedy", greedy, greedy_result)
    metrics["mean_length"] = sum(s["num_tokens"] for s in greedy) / len(greedy)
    metrics["distinct_1"] = stats.distinct_n(greedy_texts, 1, tokenize=list)
    metrics["distinct_2"] = stats.distinct_n(greedy_texts, 2, tokenize=list)
    metrics["eos_rate"] = metrics["greedy_eos_rate"]
    sampled = generate_completions(model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens,
                                   batch_size=spec.batch_size, do_sample=True, temperature=spec.temperature,
                                   seed=spec.seed)
    metrics.update(sample_metrics("sampled", sampled, score(reward, prompts, sampled, columns)))
    references = [completion_text(row["completion"]) for row in rows if row.get("completion")]
    if references and len(references) == len(rows):
        if spec.perplexity:
            nll, tokens = completion_nll(model, tokenizer, prompts, [row["completion"] for row in rows],
                                         batch_size=spec.batch_size)
            metrics["perplexity"] = stats.perplexity_from_nll(nll, tokens)
        if spec.text_metrics:
            metrics.update(text_metrics(greedy_texts, references))
    samples = [{"prompt": p, "reference": (completion_text(r["completion"]) if r.get("completion") else r.get("answer")),
                "completion": t, "correct": (bool(s) if s is not None else None)}
               for p, r, t, s in zip(prompts, rows, greedy_texts, greedy_scores.get("answer_match", [None] * len(rows)))]
    return {"path": path, "metrics": metrics, "samples": samples, "scores": greedy_scores,
            "_sampled": sampled, "_model": model, "_tokenizer": tokenizer}


def add_kl(results: dict, reference: str, spec) -> None:
    """KL(policy || reference) estimated on each policy's own sampled completions, at the sampling temperature."""
    ref = results[reference]
    if "_sampled" not in ref:  # an environment checkpoint: its episodes are greedy, no sampled completions
        return
    for entry in results.values():
        if "_sampled" not in entry:
            continue
        prompts = [s["prompt_text"] for s in entry["_sampled"]]
        token_ids = [s["token_ids"] for s in entry["_sampled"]]
        own = sequence_logprobs(entry["_model"], entry["_tokenizer"], prompts, token_ids, spec.temperature,
                                batch_size=spec.batch_size, per_token=True)
        theirs = sequence_logprobs(ref["_model"], ref["_tokenizer"], prompts, token_ids, spec.temperature,
                                   batch_size=spec.batch_size, per_token=True)
        entry["metrics"]["kl_to_reference"] = stats.kl_monte_carlo(own, theirs)


def add_win_rates(results: dict, baseline: str, judge: str, spec) -> None:
    base = results[baseline]["scores"][judge]
    for name, entry in results.items():
        if name == baseline:
            continue
        mine = entry["scores"][judge]
        pairs = [(a, b) for a, b in zip(mine, base) if a is not None and b is not None]
        if pairs:
            entry["metrics"]["win_rate"] = {judge: stats.win_rate_with_ci(
                [a for a, _ in pairs], [b for _, b in pairs], n_resamples=spec.bootstrap_resamples, seed=spec.seed)}


def add_pairwise(results: dict, baseline: str, judge_options: dict) -> dict[str, dict]:
    """Each policy against the baseline on the same prompts, by an LLM judge, each pair in both orders."""
    from reward.base import prompt_text
    from reward.judge import PairwiseJudge, pairwise_table

    judge = PairwiseJudge(**judge_options)
    try:
        base = results[baseline]["samples"]
        tables = {}
        for name, entry in results.items():
            if name == baseline:
                continue
            prompts = [prompt_text(s["prompt"]) for s in entry["samples"]]
            verdicts = judge.verdicts(prompts, [s["completion"] for s in entry["samples"]],
                                      [s["completion"] for s in base])
            tables[name] = pairwise_table(verdicts)
        return tables
    finally:
        judge.close()


def pairwise_markdown(tables: dict[str, dict], baseline: str) -> str:
    """The pairwise win-rate table: a checkpoint's wins against the baseline, judged in both orders."""
    def rate(value):
        return "-" if value is None else f"{value:.1%}"

    lines = [f"## Pairwise judge: each checkpoint against {baseline} (both orders)", "",
             "| checkpoint | n | wins | losses | ties | inconsistent | unparseable | win rate | both-order agreement "
             "| first-position rate |", "| --- | " + "--- | " * 9]
    for name, t in tables.items():
        lines.append(f"| {name} | {t['n']} | {t['wins']} | {t['losses']} | {t['ties']} | {t['inconsistent']} | "
                     f"{t['unparseable']} | {rate(t['win_rate'])} | {rate(t['agreement'])} | "
                     f"{rate(t['first_position_rate'])} |")
    lines += ["", "Win rate counts a tie or an order-dependent verdict as half a win; a first-position rate "
              "away from 50% is the judge's position bias."]
    return "\n".join(lines) + "\n"


def summary_table(results: dict) -> str:
    """A plain-text table for the terminal (the full one is in report.md)."""
    columns = [("greedy acc", "greedy_accuracy", "{:.1%}"), ("sampled acc", "sampled_accuracy", "{:.1%}"),
               ("win rate", "win_rate", "{:.1%}"), ("KL to ref", "kl_to_reference", "{:.3f}"),
               ("perplexity", "perplexity", "{:.2f}"), ("EOS rate", "eos_rate", "{:.0%}"),
               ("pref acc", "preference_accuracy", "{:.1%}")]

    def cell(metrics, key, fmt):
        value = metrics.get(key)
        if isinstance(value, dict):
            value = value.get("k1") if key == "kl_to_reference" else next(iter(value.values()), {}).get("win_rate")
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)

    used = [c for c in columns if any(entry["metrics"].get(c[1]) is not None for entry in results.values())]
    header = ["checkpoint"] + [c[0] for c in used]
    rows = [[name] + [cell(entry["metrics"], key, fmt) for _, key, fmt in used] for name, entry in results.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate_checkpoints(checkpoints: dict[str, str], *, spec_path: str | None = None, output_dir,
                         baseline: str | None = None, reference: str | None = None, spec=None,
                         lm_eval_tasks: list[str] | None = None, lm_eval_limit: int | None = None,
                         pairwise_judge: dict | None = None) -> dict:
    """Evaluate named checkpoints; write report.json, report.md and plots into `output_dir`.

    `pairwise_judge` (`reward.judge.PairwiseJudge` options) adds LLM-judged win rates against the baseline,
    each pair in both orders, to report.json ("pairwise"), report.md and pairwise.md.

    `lm_eval_tasks` adds lm-evaluation-harness scores of the policies (skipped, saying why, without lm_eval).
    """
    import reward as reward_sources
    from alignment.data import load_rows
    from alignment.evaluation.plots import plot_score_distributions, plot_training_curves
    from alignment.evaluation.report import write_report

    started = time.time()
    spec = spec or load_spec(spec_path, checkpoints)
    if not spec.data:
        raise RecipeError("the eval spec names no `data` (held-out prompts)")
    for name, path in checkpoints.items():
        if not Path(path).is_dir():
            raise AlignmentError(f"checkpoint {name!r}: no such directory {path}")
    rows, _ = load_rows(spec.data, "prompt", max_samples=spec.max_samples)
    reward = reward_sources.build([dict(r) for r in spec.rewards])
    judge = spec.judge or reward.names[0]
    policy_names = [n for n, p in checkpoints.items() if not is_reward_model(p)]
    baseline = baseline or (policy_names[0] if policy_names else None)
    reference = reference or baseline
    results = {}
    for name, path in checkpoints.items():
        print(f"evaluating {name} ({path})", flush=True)
        if is_reward_model(path):
            results[name] = {"path": path, "metrics": reward_model_metrics(path, spec), "samples": [], "scores": {}}
        else:
            results[name] = evaluate_policy_checkpoint(path, spec, rows, reward)
    policies_only = {n: results[n] for n in policy_names}
    if reference in policies_only:
        add_kl(policies_only, reference, spec)
    if baseline in policies_only:
        add_win_rates(policies_only, baseline, judge, spec)
    pairwise = add_pairwise(policies_only, baseline, pairwise_judge) if pairwise_judge and baseline in \
        policies_only else None
    for entry in results.values():
        for private in [k for k in entry if k.startswith("_")]:
            del entry[private]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    harness = None
    if lm_eval_tasks:
        from alignment.evaluation.lm_harness import run_lm_eval

        harness = run_lm_eval({n: checkpoints[n] for n in policy_names}, lm_eval_tasks, lm_eval_limit)
    report = {
        "title": "Evaluation of " + ", ".join(checkpoints),
        "spec": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in vars(spec).items()},
        "versions": package_versions(),
        "seeds": {"generation": spec.seed, "bootstrap": spec.seed},
        "baseline": baseline,
        "reference": reference,
        "judge": judge,
        "checkpoints": results,
        "plots": {},
    }
    if harness is not None:
        report["lm_eval"] = harness
    if pairwise is not None:
        report["pairwise"] = pairwise
    if policy_names:
        plot_score_distributions(report, out / "scores.png")
        report["plots"]["Score distributions (greedy)"] = "scores.png"
    run_dirs = {n: p for n, p in checkpoints.items() if (Path(p) / "metrics.jsonl").is_file()}
    if run_dirs:
        plot_training_curves(run_dirs, out / "training.png")
        report["plots"]["Training curves"] = "training.png"
    report["seconds"] = round(time.time() - started, 1)
    write_report(report, out, max_samples=spec.report_samples)
    if pairwise is not None:
        table = pairwise_markdown(pairwise, baseline)
        (out / "pairwise.md").write_text(table, encoding="utf-8")
        with open(out / "report.md", "a", encoding="utf-8") as md:
            md.write("\n" + table)
    report["table"] = summary_table(results)
    return report


def cmd_eval(args) -> int:
    from alignment.evaluation.lm_harness import parse_tasks

    names = [Path(p).name for p in args.checkpoints]
    if len(set(names)) != len(names):
        names = [str(p) for p in args.checkpoints]
    checkpoints = dict(zip(names, args.checkpoints))
    for role in ("baseline", "reference"):
        value = getattr(args, role)
        if value is not None and value not in checkpoints:
            raise RecipeError(f"--{role} {value!r} is not one of the checkpoints: {', '.join(checkpoints)}")
    report = evaluate_checkpoints(checkpoints, spec_path=args.spec, output_dir=args.output,
                                  baseline=args.baseline, reference=args.reference,
                                  lm_eval_tasks=parse_tasks(args.lm_eval), lm_eval_limit=args.lm_eval_limit,
                                  pairwise_judge=judge_options(args.judge, args.judge_model))
    print("\n" + report["table"])
    print(f"\nreport: {Path(args.output) / 'report.md'} ({report['seconds']:.0f}s)")
    return 0


def judge_options(judge: str | None, model_name: str | None) -> dict | None:
    """--judge URL (an OpenAI-compatible endpoint) or DIR (a local causal LM) -> PairwiseJudge options."""
    if not judge:
        return None
    options = {"endpoint": judge} if judge.startswith(("http://", "https://")) else {"model": judge}
    if model_name:
        options["model_name"] = model_name
    return options


def add_command(commands) -> None:
    parser = commands.add_parser(
        "eval", help="compare checkpoints side by side (report.json, report.md, plots)",
        description="Generate on held-out prompts with each checkpoint and compare: rewards, accuracy, win rate "
        "with a 95%% CI, KL to a reference, perplexity, BLEU/ROUGE, length, diversity, EOS rate.",
    )
    parser.add_argument("checkpoints", nargs="+", help="run directories (names in the report: their folder names)")
    parser.add_argument("--spec", help="eval spec YAML (or a recipe with an eval: section); "
                        "default: the first checkpoint's recipe eval section")
    parser.add_argument("--output", required=True, help="folder for report.json, report.md and plots")
    parser.add_argument("--baseline", help="checkpoint the win rates compare against (default: the first)")
    parser.add_argument("--reference", help="checkpoint KL is measured to (default: the baseline)")
    parser.add_argument("--lm-eval", metavar="TASKS", help="also run these lm-evaluation-harness tasks "
                        "(comma list, e.g. arc_easy,hellaswag) on each policy; needs `pip install lm-eval`, "
                        "skipped with a notice without it")
    parser.add_argument("--lm-eval-limit", metavar="N", type=positive_int,
                        help="at most N examples per lm-eval task (quick checks; not comparable to published scores)")
    parser.add_argument("--judge", metavar="URL_OR_DIR", help="pairwise LLM judge of each checkpoint against the "
                        "baseline, each pair in both orders (pairwise.md): an OpenAI-compatible endpoint "
                        "(vllm serve, trl vllm-serve) or a local causal-LM directory")
    parser.add_argument("--judge-model", metavar="NAME", help="the endpoint's model name (its 'model' field)")
    parser.set_defaults(func=cmd_eval)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value
