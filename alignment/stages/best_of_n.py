"""Stage `best_of_n`: rejection sampling - N samples per prompt, scored, the best kept (optionally fine-tuned on).

    align run recipes/tiny/best_of_n.yaml

1. Sample ``options.num_samples`` completions per prompt of ``data.train`` from
   the policy ``model.name_or_path`` (temperature ``options.temperature``, pure
   ancestral sampling: top-k and top-p off), seeded by the recipe's seed.
2. Score every sample with the recipe's ``reward:`` list (``reward.build``: the
   same sources PPO, GRPO and evaluation use; dataset columns such as ``answer``
   reach them as keyword arguments). A sample scored None, or with no EOS when
   ``options.require_eos``, is not a candidate.
3. Keep the best-scoring candidate of each prompt (ties: the first sampled),
   when it scores at least ``options.min_score``; write them to
   ``best_of_n.jsonl`` in the run directory (trl's prompt/completion format,
   conversational when the prompts are, plus ``score``, ``mean_score`` and
   ``num_candidates`` columns).
4. ``options.write_pairs``: also ``pairs.jsonl`` (prompt/chosen/rejected, best
   against worst, only where the best scores strictly higher; ``min_score`` does
   not apply, a pair is a relative judgement) for the reward model, DPO and relatives.
5. ``options.finetune``: supervised fine-tuning on the kept completions through
   the SFT stage's path (trl's SFTTrainer configured by ``train:``, loss on the
   completion only, common.train with its guards), then the run directory is a
   policy checkpoint with before/after held-out metrics. Without it the run
   directory holds the data, metrics.json and run_info.json (no weights).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from alignment import data
from alignment.checkpoint import RUN_INFO, save_run, write_atomic, write_json
from alignment.errors import DataError
from alignment.recipe import check, positive
from alignment.stages import common

BEST_FILE = "best_of_n.jsonl"
PAIRS_FILE = "pairs.jsonl"
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class Options:
    """`options:` of a best_of_n recipe."""

    num_samples: int = field(default=8, metadata=check(positive))  # N completions per prompt
    temperature: float = field(default=1.0, metadata=check(positive))  # sampling temperature
    max_new_tokens: int = field(default=32, metadata=check(positive))  # length cap of each sample
    batch_size: int = field(default=256, metadata=check(positive))  # sequences per generate() call
    min_score: Union[float, None] = None  # keep a prompt's best only if it scores at least this (null: always)
    require_eos: bool = True  # a sample that never stopped is not a candidate (SFT on it would teach rambling)
    write_pairs: bool = False  # also pairs.jsonl: best as chosen, worst as rejected (strictly lower score)
    write_samples: bool = False  # also samples.jsonl: every sample with its score
    finetune: bool = False  # SFT on the kept completions (train: is trl's SFTConfig), then save the policy
    evaluate_before: bool = True  # held-out metrics of the sampling policy (eval: section)


def as_completion(prompt, text: str):
    """trl's format: an assistant message list when the prompt is conversational, else the string."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def sample(model, tokenizer, rows: list[dict], options, seed: int) -> list[list[dict]]:
    """``options.num_samples`` samples per row: ``[[{"text", "ended_with_eos", ...}, ...], ...]``."""
    from alignment.evaluation.generate import generate_completions

    n = options["num_samples"]
    prompts = [row["prompt"] for row in rows for _ in range(n)]
    samples = generate_completions(model, tokenizer, prompts, max_new_tokens=options["max_new_tokens"],
                                   batch_size=options["batch_size"], do_sample=True,
                                   temperature=options["temperature"], seed=seed)
    return [samples[i * n:(i + 1) * n] for i in range(len(rows))]


def score(rewards, rows: list[dict], samples: list[list[dict]]) -> tuple[list[list[float | None]], dict]:
    """Each sample's combined score (None: no source applied) and the reward metrics of the call."""
    n = len(samples[0]) if samples else 0
    prompts = [row["prompt"] for row in rows for _ in range(n)]
    completions = [as_completion(row["prompt"], s["text"]) for row, group in zip(rows, samples) for s in group]
    names = sorted({key for row in rows for key in row} - {"prompt"})
    columns = {name: [row.get(name) for row in rows for _ in range(n)] for name in names}
    completion_ids = [s["token_ids"] for group in samples for s in group]  # trl's argument: the sampled ids
    result = rewards(prompts, completions, completion_ids=completion_ids, **columns)
    flat = result.total
    return [flat[i * n:(i + 1) * n] for i in range(len(rows))], result.metrics


def select(rows, samples, scores, options) -> tuple[list[dict], list[dict], dict]:
    """The best (and worst) candidate of every prompt: ``(best rows, pair rows, counts)``."""
    best_rows, pair_rows = [], []
    counts = {"no_candidate": 0, "below_min_score": 0, "tied_pairs": 0}
    for row, group, group_scores in zip(rows, samples, scores):
        candidates = [(s, sample) for s, sample in zip(group_scores, group)
                      if s is not None and (sample["ended_with_eos"] or not options["require_eos"])]
        if not candidates:
            counts["no_candidate"] += 1
            continue
        values = [s for s, _ in candidates]
        best = max(range(len(candidates)), key=lambda i: (values[i], -i))  # the first of the top scores
        worst = min(range(len(candidates)), key=lambda i: (values[i], i))
        mean = math.fsum(values) / len(values)
        if options["min_score"] is not None and values[best] < options["min_score"]:
            counts["below_min_score"] += 1
        else:
            best_rows.append({"prompt": row["prompt"], "completion": as_completion(row["prompt"], candidates[best][1]["text"]),
                              **_columns(row), "score": values[best], "mean_score": mean,
                              "num_candidates": len(candidates)})
        if values[best] > values[worst]:
            pair_rows.append({"prompt": row["prompt"],
                              "chosen": as_completion(row["prompt"], candidates[best][1]["text"]),
                              "rejected": as_completion(row["prompt"], candidates[worst][1]["text"]),
                              **_columns(row), "chosen_score": values[best], "rejected_score": values[worst]})
        else:
            counts["tied_pairs"] += 1
    return best_rows, pair_rows, counts


def _columns(row: dict) -> dict:
    """The dataset's other columns (e.g. ``answer``), carried into the written rows."""
    return {k: v for k, v in row.items() if k not in ("prompt", "completion")}


def _mean(values):
    return math.fsum(values) / len(values) if values else None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def summarize(scores, best_rows, pair_rows, counts, options) -> dict:
    """Mean score of all samples vs of the kept best, and what was kept, dropped or tied."""
    flat = [s for group in scores for s in group if s is not None]
    return {
        "num_prompts": len(scores),
        "samples_per_prompt": options["num_samples"],
        "mean_sample_score": _mean(flat),
        "mean_best_score": _mean([r["score"] for r in best_rows]),
        "kept": len(best_rows),
        "pairs": len(pair_rows) if options["write_pairs"] else None,
        "mean_chosen_minus_rejected": _mean([p["chosen_score"] - p["rejected_score"] for p in pair_rows])
        if options["write_pairs"] else None,
        **counts,
    }


def trainer_config(recipe, run_dir):
    """The SFT stage's config, for the optional fine-tuning on the kept completions (built by `align validate`)."""
    from alignment.stages import sft

    return sft.trainer_config(recipe, run_dir)


def finetune(recipe, model, tokenizer, best_rows, run_dir, resume_from):
    """SFT on the kept completions: the SFT stage's trainer path (trl SFTTrainer + common.train)."""
    import datasets
    from trl import SFTTrainer

    if not best_rows:
        raise DataError(f"{recipe.source_path}: no completion was kept (see options.min_score / require_eos); "
                        "nothing to fine-tune on")
    train_set = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in best_rows])
    args = trainer_config(recipe, run_dir)
    trainer = SFTTrainer(**common.trainer_inputs(recipe, model, tokenizer, args, train_set))
    common.train(trainer, recipe, run_dir, resume_from)
    return trainer


def run(recipe) -> dict:
    import reward as reward_sources

    started, run_dir, resume_from = common.start_run(recipe)
    options = recipe.options
    splits = data.load(recipe.data, "prompt", seed=recipe.seed)
    rows = splits.train.to_list()
    rewards = reward_sources.build([dict(spec) for spec in recipe.reward])
    model, tokenizer = common.load_policy(recipe)
    before = common.evaluate_policy(model, tokenizer, recipe.eval) if options["evaluate_before"] else None
    samples = sample(model, tokenizer, rows, options, seed=recipe.seed)
    sampled = time.time()
    scores, reward_metrics = score(rewards, rows, samples)
    rewards.close()
    best_rows, pair_rows, counts = select(rows, samples, scores, options)
    write_jsonl(run_dir / BEST_FILE, best_rows)
    if options["write_pairs"]:
        write_jsonl(run_dir / PAIRS_FILE, pair_rows)
    if options["write_samples"]:
        write_jsonl(run_dir / SAMPLES_FILE, [
            {"prompt": row["prompt"], "completion": as_completion(row["prompt"], s["text"]), "score": value,
             "ended_with_eos": s["ended_with_eos"]}
            for row, group, group_scores in zip(rows, samples, scores) for s, value in zip(group, group_scores)])
    metrics = {
        "stage": "best_of_n",
        "best_of_n": summarize(scores, best_rows, pair_rows, counts, options),
        "rewards": reward_metrics,
        "reward_failures": {source.name: source.stats.as_dict() for source in rewards.sources},
        "files": [BEST_FILE] + ([PAIRS_FILE] if options["write_pairs"] else [])
        + ([SAMPLES_FILE] if options["write_samples"] else []),
        "sampling_seconds": round(sampled - started, 1),
        "before": before,
        "data": [vars(report) for report in splits.reports],
    }
    if options["finetune"]:
        trainer = finetune(recipe, model, tokenizer, best_rows, run_dir, resume_from)
        metrics.update({
            "train_loss": common.final_train_loss(trainer),
            "train_steps": trainer.state.global_step,
            "after": common.evaluate_policy(trainer.model, tokenizer, recipe.eval),
            "train_seconds": round(time.time() - started, 1),
        })
        save_run(run_dir, model=trainer.model, tokenizer=tokenizer, recipe=recipe, run_info=common.run_info(recipe),
                 metrics=metrics)
    else:  # a data-only run: the files, the numbers, and the "complete" marker last
        metrics["train_seconds"] = round(time.time() - started, 1)
        write_json(run_dir / "metrics.json", metrics)
        write_json(run_dir / RUN_INFO, dict(common.run_info(recipe), complete=True,
                                            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    best = metrics["best_of_n"]
    metrics["summary"] = (common.summary_line("best_of_n", run_dir, metrics, started)
                          + f" | {best['kept']}/{best['num_prompts']} prompts kept, mean score "
                          f"{_fmt(best['mean_sample_score'])} (all samples) -> {_fmt(best['mean_best_score'])} (best)")
    return metrics


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
