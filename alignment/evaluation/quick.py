"""Held-out task metrics of one policy, run at the end of every training stage.

Greedy accuracy is what a user sees; sampled accuracy and reward are what the
RL objective moves.  Both are reported, side by side (see docs/demo.md).
"""

from __future__ import annotations

from alignment.data import load_rows

ACCURACY_SOURCE = "answer_match"


def eval_columns(rows: list[dict]) -> dict[str, list]:
    """Every column except prompt/completion, as lists: rewards read them as keyword arguments."""
    names = sorted({key for row in rows for key in row} - {"prompt", "completion"})
    return {name: [row.get(name) for row in rows] for name in names}


def score_completions(reward, prompts, completions, columns) -> dict:
    """Mean total reward and per-source means over the samples each source applied to."""
    result = reward(prompts, completions, **columns)
    out = {key: value for key, value in result.metrics.items()}
    if ACCURACY_SOURCE in result.per_source:
        applied = [s for s in result.per_source[ACCURACY_SOURCE] if s is not None]
        out["accuracy"] = sum(applied) / len(applied) if applied else None
    return out


def decode_metrics(samples: list[dict]) -> dict:
    n = len(samples)
    return {
        "eos_rate": sum(s["ended_with_eos"] for s in samples) / n,
        "mean_length": sum(s["num_tokens"] for s in samples) / n,
    }


def policy_task_metrics(model, tokenizer, eval_spec) -> dict:
    """Greedy and (optionally) sampled completions of the held-out prompts, scored by the spec's rewards."""
    import reward as reward_sources
    from alignment.evaluation.generate import generate_completions

    rows, _ = load_rows(eval_spec.data, "prompt", max_samples=eval_spec.max_samples)
    prompts = [row["prompt"] for row in rows]
    columns = eval_columns(rows)
    reward = reward_sources.build([dict(r) for r in eval_spec.rewards])
    metrics = {"num_prompts": len(prompts)}
    modes = [("greedy", False)] + ([("sampled", True)] if eval_spec.sampled else [])
    for mode, do_sample in modes:
        samples = generate_completions(
            model, tokenizer, prompts, max_new_tokens=eval_spec.max_new_tokens, batch_size=eval_spec.batch_size,
            do_sample=do_sample, temperature=eval_spec.temperature, seed=eval_spec.seed,
        )
        scores = score_completions(reward, prompts, [s["text"] for s in samples],
                                   {**columns, "completion_ids": [s["token_ids"] for s in samples]})
        scores.update(decode_metrics(samples))
        for key, value in scores.items():
            metrics[f"{mode}_{key}" if "/" not in key else f"{mode}/{key}"] = value
    return metrics
