"""Held-out metrics of a policy in an environment: greedy episodes, scored like any completion.

For a stage (or checkpoint) whose recipe has `environment:`, each held-out row
is played as an episode (alignment.envs.run_episodes) with greedy turns of at
most ``eval.max_new_tokens`` tokens each, and the eval rewards score the
finished conversation (its last assistant message, as in training).  Reported:

    greedy_accuracy            answer_match over the rows it applies to
    greedy_reward              the combined eval reward
    greedy/env/tool_call_rate  share of episodes with a well-formed tool call
    greedy/env/malformed_call_rate, greedy/env/turns, ... (alignment.envs.episode_metrics)
    by_<column>                the same, split by a boolean column of the data (e.g. `carry`)
    transcripts                the first few episodes as rendered text
"""

from __future__ import annotations

TRANSCRIPTS = 3


def play_eval_episodes(model, tokenizer, environment, eval_spec):
    """Greedy episodes of the held-out rows, scored by the eval rewards: ``(rows, episodes, reward result)``."""
    import reward as reward_sources
    from alignment.data import load_rows
    from alignment.envs import load_factory, run_episodes
    from alignment.evaluation.quick import eval_columns
    from alignment.ppo.episodes import completion_until_answer, turn_generator

    rows, _ = load_rows(eval_spec.data, "prompt", max_samples=eval_spec.max_samples)
    factory = load_factory(environment)
    was_training = model.training
    model.eval()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    generate = turn_generator(model, tokenizer, max_new_tokens=eval_spec.max_new_tokens, temperature=1.0,
                              max_positions=max_positions, device=model.device, greedy=True)
    episodes = []
    for start in range(0, len(rows), eval_spec.batch_size):
        chunk = rows[start:start + eval_spec.batch_size]
        episodes += run_episodes(generate, tokenizer, [factory() for _ in chunk], [dict(r) for r in chunk],
                                 strict=environment.strict, max_turns=environment.max_turns,
                                 tool_timeout=environment.tool_timeout,
                                 max_tokens=None if max_positions is None else max_positions - 1)
    model.train(was_training)
    reward = reward_sources.build([dict(r) for r in eval_spec.rewards])
    result = reward([row["prompt"] for row in rows], [completion_until_answer(e) for e in episodes],
                    **eval_columns(rows))
    return rows, episodes, result


def episode_task_metrics(model, tokenizer, environment, eval_spec, transcripts: int = TRANSCRIPTS) -> dict:
    """The held-out numbers of the module docstring, for a stage's metrics.json."""
    rows, episodes, result = play_eval_episodes(model, tokenizer, environment, eval_spec)
    return summarize_eval_episodes(rows, episodes, result, tokenizer, transcripts)


def summarize_eval_episodes(rows, episodes, result, tokenizer, transcripts: int = TRANSCRIPTS) -> dict:
    from alignment.envs.episode import episode_metrics
    from alignment.evaluation.quick import ACCURACY_SOURCE, eval_columns

    columns = eval_columns(rows)
    correct = result.per_source.get(ACCURACY_SOURCE)

    def summary(indices: list[int]) -> dict:
        out = {"num_prompts": len(indices)}
        if correct is not None:
            applied = [correct[i] for i in indices if correct[i] is not None]
            out["greedy_accuracy"] = sum(applied) / len(applied) if applied else None
        totals = [result.total[i] for i in indices if result.total[i] is not None]
        out["greedy_reward"] = sum(totals) / len(totals) if totals else None
        out.update({f"greedy/{k}": v for k, v in episode_metrics([episodes[i] for i in indices]).items()})
        return out

    metrics = summary(list(range(len(rows))))
    metrics.update({f"greedy/{key}": value for key, value in result.metrics.items()})
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
