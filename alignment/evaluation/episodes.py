"""Held-out metrics of a policy in an environment: greedy (and sampled) episodes, scored like any completion.

For a stage (or checkpoint) whose recipe has `environment:`, each held-out row
is played as an episode (alignment.envs.run_episodes) with greedy turns of at
most ``eval.max_new_tokens`` tokens each, and the eval rewards score the
finished conversation (its last assistant message, as in training).  With
``eval.sampled`` (the default) every row is played once more at
``eval.temperature``, seeded by ``eval.seed``: what the RL objective moves, as
sampled accuracy is for single-turn completions.  Reported, for ``greedy`` and
``sampled`` alike:

    greedy_accuracy            answer_match over the rows it applies to
    greedy_reward              the combined eval reward
    greedy/env/tool_call_rate  share of episodes with a well-formed tool call
    greedy/env/malformed_call_rate, greedy/env/turns, ... (alignment.envs.episode_metrics)
    greedy/accuracy_with_call  answer_match over the episodes that made a well-formed call
    greedy/accuracy_without_call  ... over those that answered with no call (none malformed)
    by_<column>                the same, split by a boolean column of the data (e.g. `carry`)
    transcripts                the first few greedy episodes as rendered text
"""

from __future__ import annotations

import contextlib

TRANSCRIPTS = 3


def play_eval_episodes(model, tokenizer, environment, eval_spec, greedy: bool = True):
    """Greedy (or, ``greedy=False``, sampled at ``eval_spec.temperature`` from ``eval_spec.seed``) episodes of
    the held-out rows, scored by the eval rewards: ``(rows, episodes, reward result)``."""
    import torch

    import reward as reward_sources
    from alignment.data import load_rows
    from alignment.envs import load_factory
    from alignment.evaluation.quick import eval_columns
    from alignment.ppo.episodes import completion_until_answer, turn_generator

    rows, _ = load_rows(eval_spec.data, "prompt", max_samples=eval_spec.max_samples)
    factory = load_factory(environment)
    was_training = model.training
    model.eval()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    temperature = 1.0 if greedy else eval_spec.temperature
    generate = turn_generator(model, tokenizer, max_new_tokens=eval_spec.max_new_tokens, temperature=temperature,
                              max_positions=max_positions, device=model.device, greedy=greedy)
    # sampled: seeded, and the caller's random streams left as they were (a training run's continue unchanged)
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    rng = contextlib.nullcontext() if greedy else torch.random.fork_rng(devices=devices)
    with rng:
        if not greedy:
            torch.manual_seed(eval_spec.seed)
        episodes = _play(generate, tokenizer, factory, rows, environment, eval_spec, max_positions)
    model.train(was_training)
    reward = reward_sources.build([dict(r) for r in eval_spec.rewards])
    result = reward([row["prompt"] for row in rows], [completion_until_answer(e) for e in episodes],
                    **eval_columns(rows))
    return rows, episodes, result


def _play(generate, tokenizer, factory, rows, environment, eval_spec, max_positions) -> list:
    from alignment.envs import run_episodes

    episodes = []
    for start in range(0, len(rows), eval_spec.batch_size):
        chunk = rows[start:start + eval_spec.batch_size]
        episodes += run_episodes(generate, tokenizer, [factory() for _ in chunk], [dict(r) for r in chunk],
                                 strict=environment.strict, max_turns=environment.max_turns,
                                 tool_timeout=environment.tool_timeout,
                                 max_tokens=None if max_positions is None else max_positions - 1)
    return episodes


def evaluate_in_environment(model, tokenizer, environment, eval_spec, transcripts: int = TRANSCRIPTS):
    """Greedy episodes, and sampled ones with ``eval_spec.sampled``: ``(rows, the greedy episodes, their reward
    result, the numbers of the module docstring)``."""
    rows, episodes, result = play_eval_episodes(model, tokenizer, environment, eval_spec)
    metrics = summarize_eval_episodes(rows, episodes, result, tokenizer, transcripts)
    if eval_spec.sampled:  # what RL moves: the calls a policy tries, and whether they pay
        sampled = play_eval_episodes(model, tokenizer, environment, eval_spec, greedy=False)
        merge_modes(metrics, summarize_eval_episodes(*sampled, tokenizer, 0, "sampled"))
    return rows, episodes, result, metrics


def episode_task_metrics(model, tokenizer, environment, eval_spec, transcripts: int = TRANSCRIPTS) -> dict:
    """The held-out numbers of the module docstring, for a stage's metrics.json."""
    return evaluate_in_environment(model, tokenizer, environment, eval_spec, transcripts)[3]


def merge_modes(metrics: dict, other: dict) -> None:
    """Add another mode's summary (its keys are prefixed by the mode) to ``metrics``, the splits included."""
    for key, value in other.items():
        if key.startswith("by_") and isinstance(value, dict):
            for flag, split in value.items():
                metrics.setdefault(key, {}).setdefault(flag, {}).update(split)
        elif key not in ("num_prompts", "transcripts"):
            metrics[key] = value


def _accuracy(correct, indices) -> float | None:
    applied = [correct[i] for i in indices if correct[i] is not None]
    return sum(applied) / len(applied) if applied else None


def summarize_eval_episodes(rows, episodes, result, tokenizer, transcripts: int = TRANSCRIPTS,
                            mode: str = "greedy") -> dict:
    from alignment.envs.episode import episode_metrics
    from alignment.evaluation.quick import ACCURACY_SOURCE, eval_columns

    columns = eval_columns(rows)
    correct = result.per_source.get(ACCURACY_SOURCE)
    called = [any(turn.parsed.calls for turn in e.turns) for e in episodes]
    direct = [not c and not e.malformed_calls for c, e in zip(called, episodes)]

    def summary(indices: list[int]) -> dict:
        out = {"num_prompts": len(indices)}
        if correct is not None:
            out[f"{mode}_accuracy"] = _accuracy(correct, indices)
            # whether calling pays: the accuracy of the episodes that called, and of those that answered directly
            out[f"{mode}/accuracy_with_call"] = _accuracy(correct, [i for i in indices if called[i]])
            out[f"{mode}/accuracy_without_call"] = _accuracy(correct, [i for i in indices if direct[i]])
        totals = [result.total[i] for i in indices if result.total[i] is not None]
        out[f"{mode}_reward"] = sum(totals) / len(totals) if totals else None
        out.update({f"{mode}/{k}": v for k, v in episode_metrics([episodes[i] for i in indices]).items()})
        return out

    metrics = summary(list(range(len(rows))))
    metrics.update({f"{mode}/{key}": value for key, value in result.metrics.items()})
    for name in sorted(columns):  # boolean columns split the numbers (carry / no carry)
        values = columns[name]
        if values and all(isinstance(v, bool) for v in values):
            metrics[f"by_{name}"] = {str(flag).lower(): summary([i for i, v in enumerate(values) if v is flag])
                                     for flag in (True, False) if flag in values}
    metrics["transcripts"] = [{"prompt": e.prompt[-1]["content"],
                               "completion": tokenizer.decode(e.completion_ids, skip_special_tokens=False),
                               "stop": e.stop, "correct": None if correct is None else correct[i]}
                              for i, e in enumerate(episodes[:transcripts])]
    return metrics
