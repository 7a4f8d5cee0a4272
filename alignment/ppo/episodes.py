"""Multi-turn rollouts for our PPO loop: every prompt row becomes an episode of an environment (alignment.envs).

The policy samples each turn with the loop's own generation code and settings
(:func:`alignment.ppo.rollout.generate_responses`: temperature ``T``, top_k 0,
top_p 1, ``max_new_tokens`` per turn, stopping at the end-of-turn tokens of
policies.tokens.end_token_ids), batched over the episodes still running;
:func:`alignment.envs.run_episodes` parses each turn, runs the tools and
appends the environment's tokens.

Token in, token out: the response tensor of row ``i`` is exactly episode
``i``'s ``completion_ids`` (every token after the first prompt, the policy's
as sampled and the environment's as rendered), and ``policy_mask`` is its
``completion_mask`` (1 = sampled by the policy).  The forward passes read the
whole sequence (the environment's tokens are context), but log-probs, values,
entropy, the KL, the losses and the whitening use ``response_mask &
policy_mask`` only (:attr:`Rollout.token_mask`).  Rewards: the recipe's
sources on the finished conversation at the last policy token (the trainer's
score), plus the environment's own (each turn's ``step`` reward at that turn's
last policy token, ``get_reward()`` at the last one) in ``env_rewards``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from alignment.ppo.rollout import (
    Rollout,
    _token_statistics,
    _unwrap_lm,
    generate_responses,
    stop_token_ids,
    truncate_after_eos,
)

__all__ = ["collect_episode_rollout", "episode_tensors", "final_answer_text", "turn_generator"]


def turn_generator(model, tokenizer, *, max_new_tokens: int, temperature: float, max_positions: int | None,
                   device=None, greedy: bool = False) -> Callable[[list[list[int]]], list[list[int]]]:
    """``generate(list of token ids) -> each one's new tokens``, for :func:`alignment.envs.run_episodes`.

    The sequences are left-padded and sampled together; each new turn is cut after its first end-of-turn token
    (kept, as the single-turn rollout keeps the EOS).  ``max_positions``: the model's context; each sequence's turn
    gets at most what is left of it after *that* sequence (one long episode in the batch must not shorten the
    turns of the others: with a batch-wide budget, a long error reply in one episode cut every other episode's
    answer to two tokens).  The batch is sampled for the largest budget, and each row is then cut to its own, so
    no kept token sits past the model's positions.
    """
    eos_ids = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id

    def generate(sequences: list[list[int]]) -> list[list[int]]:
        budgets = [max_new_tokens if max_positions is None else min(max_new_tokens, max_positions - len(s))
                   for s in sequences]
        out: list[list[int]] = [[] for _ in sequences]  # no room: an empty turn ends that episode ("empty")
        live = [i for i, b in enumerate(budgets) if b > 0]
        if not live:
            return out
        width = max(len(sequences[i]) for i in live)
        ids = torch.full((len(live), width), pad, dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        for row, i in enumerate(live):
            seq = sequences[i]
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        raw = generate_responses(model, ids.to(device), mask.to(device), max_new_tokens=max(budgets[i] for i in live),
                                 temperature=temperature, eos_token_ids=eos_ids, pad_token_id=pad,
                                 do_sample=not greedy)
        new, keep, _ = truncate_after_eos(raw, eos_ids, pad)
        for row, i in enumerate(live):
            out[i] = new[row][keep[row]].tolist()[:budgets[i]]  # cut past its budget: not closed ("length")
        return out

    return generate


def episode_tensors(episodes, pad_token_id: int, device=None) -> dict[str, torch.Tensor]:
    """The rollout tensors of a batch of episodes: prompts left-padded, completions right-padded.

    ``response_mask`` (bool) marks real completion tokens (policy and environment: the forward passes attend to
    both), ``policy_mask`` (bool) the policy's own, ``has_eos`` whether the last turn ended with an end-of-turn
    token (not cut by the length), ``env_rewards`` (float) each turn's ``step`` reward at its last policy token
    (``Episode.turn_ends``) and ``get_reward()`` added at the last one.
    """
    n = len(episodes)
    q_width = max(len(e.prompt_ids) for e in episodes)
    r_width = max(1, max(len(e.completion_ids) for e in episodes))
    query_ids = torch.full((n, q_width), pad_token_id, dtype=torch.long)
    query_mask = torch.zeros((n, q_width), dtype=torch.long)
    response_ids = torch.full((n, r_width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((n, r_width), dtype=torch.bool)
    policy_mask = torch.zeros((n, r_width), dtype=torch.bool)
    env_rewards = torch.zeros((n, r_width), dtype=torch.float32)
    has_eos = torch.zeros(n, dtype=torch.bool)
    for i, episode in enumerate(episodes):
        prompt, completion = episode.prompt_ids, episode.completion_ids
        query_ids[i, q_width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        query_mask[i, q_width - len(prompt):] = 1
        if completion:
            response_ids[i, :len(completion)] = torch.tensor(completion, dtype=torch.long)
            response_mask[i, :len(completion)] = True
            policy_mask[i, :len(completion)] = torch.tensor(episode.completion_mask, dtype=torch.bool)
        ends = episode.turn_ends
        for end, reward in zip(ends, episode.turn_rewards):
            if reward is not None:
                env_rewards[i, end] += float(reward)
        if episode.final_reward is not None and ends:
            env_rewards[i, ends[-1]] += float(episode.final_reward)
        has_eos[i] = bool(episode.turns) and episode.turns[-1].closed
    tensors = {"query_ids": query_ids, "query_mask": query_mask, "response_ids": response_ids,
               "response_mask": response_mask, "policy_mask": policy_mask, "env_rewards": env_rewards,
               "has_eos": has_eos}
    return {k: v.to(device) for k, v in tensors.items()}


def final_answer_text(episode) -> str:
    """The content of the episode's last assistant message: what a text reward reads (as under trl's GRPO)."""
    for message in reversed(episode.completion):
        if message.get("role") == "assistant":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def completion_until_answer(episode) -> list[dict]:
    """The episode's messages after the prompt, up to and including its last assistant message."""
    messages = list(episode.completion)
    while messages and messages[-1].get("role") != "assistant":
        messages.pop()
    return messages


def collect_episode_rollout(policy, ref_policy, critic, tokenizer, rows: Sequence[dict], factory, spec, *,
                            max_new_tokens: int, temperature: float, forward_batch_size: int, device=None,
                            policy_pass: bool = True, max_positions: int | None = None):
    """Play one episode per row, then policy/reference log-probs, entropy and values over the policy's tokens.

    ``factory()`` builds one environment (alignment.envs.load_factory); ``spec`` is the recipe's
    EnvironmentSpec (max_turns, tool_timeout, strict).  Returns ``(rollout, episodes)``; the rollout's
    ``completions`` are each episode's final answer text and ``conversations`` its messages up to that answer.
    """
    from alignment.envs import run_episodes

    for model in (policy, ref_policy, critic):
        if model is not None:
            model.eval()
    lm = _unwrap_lm(policy)
    generate = turn_generator(lm, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                              max_positions=max_positions, device=device)
    envs = [factory() for _ in rows]
    # a reply that would leave no room for the next turn ends the episode before it is appended
    max_tokens = None if max_positions is None else max_positions - 1
    episodes = run_episodes(generate, tokenizer, envs, [dict(r) for r in rows], strict=spec.strict,
                            max_turns=spec.max_turns, tool_timeout=spec.tool_timeout, max_tokens=max_tokens,
                            end_token_ids=set(stop_token_ids(tokenizer, lm)))
    t = episode_tensors(episodes, tokenizer.pad_token_id, device)
    batch = {"query_ids": t["query_ids"], "query_mask": t["query_mask"], "response_ids": t["response_ids"]}
    # the forward passes attend to every real token; the statistics are kept on the policy's tokens only
    stats = _token_statistics(policy, ref_policy, critic, batch, t["response_mask"], temperature,
                              forward_batch_size, policy_pass)
    zeros = torch.zeros(t["policy_mask"].shape, dtype=torch.float32, device=t["policy_mask"].device)
    stats = {k: torch.where(t["policy_mask"], v, zeros) for k, v in stats.items()}
    rollout = Rollout(
        prompts=[r["prompt"] for r in rows],
        completions=[final_answer_text(e) for e in episodes],
        query_ids=t["query_ids"],
        query_mask=t["query_mask"],
        response_ids=t["response_ids"],
        response_mask=t["response_mask"],
        has_eos=t["has_eos"],
        policy_mask=t["policy_mask"],
        env_rewards=t["env_rewards"],
        conversations=[completion_until_answer(e) for e in episodes],
        **stats,
    )
    return rollout, episodes
