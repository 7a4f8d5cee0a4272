"""One multi-turn episode, token in and token out, over any ``generate(token_ids) -> new token_ids``.

    episode = run_episode(generate, tokenizer, Calculator(), row, max_turns=4)
    episode.token_ids, episode.mask        # mask: 1 = sampled by the policy, 0 = prompt / environment
    episode.turns[1].calls, episode.malformed_calls

The policy generates a turn; the turn is parsed (alignment.envs.tool_calls);
its calls run with a time limit, or ``step(text)`` answers a turn without
calls; the environment's reply is appended as tokens; and so on until the
environment is done, the policy answers without a call, or ``max_turns``.

The tokens are never re-encoded: the policy's are kept exactly as sampled and
the environment's are the chat template's rendering of the reply, cut out of
the conversation rendered before and after it (as trl does).  So a PPO loop can
train on ``token_ids`` with ``mask`` and its log-probabilities and KL cover
exactly the tokens the policy chose.  The strict check (on by default) then
renders the whole conversation once more and requires the same text, turn by
turn, and the same tokens outside the policy's own (see
:func:`check_retokenization`): a template that is not prefix-preserving (e.g.
it drops a newline between turns that it renders after the last one) would
otherwise train the model on a context it never sees when served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from alignment.envs.base import (
    EnvError,
    RetokenizationError,
    StepResult,
    bad_arguments,
    call_with_timeout,
    tool_schemas,
    tools_of,
)
from alignment.envs.tool_calls import ParsedTurn, error_text, parse_assistant, result_text


@dataclass
class Turn:
    """One assistant turn and the environment's reply to it."""

    index: int
    policy_ids: list[int]
    text: str  # the policy's tokens decoded
    parsed: ParsedTurn
    closed: bool  # ended by an end-of-turn token (else cut by the generation length)
    replies: list[dict] = field(default_factory=list)  # the messages the environment answered with
    env_ids: list[int] = field(default_factory=list)  # their tokens, as appended (empty after the last turn)
    reward: float | None = None  # step()'s reward for this turn
    tool_errors: int = 0  # calls that raised, named an unknown tool, had wrong arguments or timed out
    timed_out: int = 0
    tool_seconds: float = 0.0


@dataclass
class Episode:
    prompt: list[dict]  # the prompt messages (the reset observation appended)
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)  # every token after the prompt: policy and environment
    completion_mask: list[int] = field(default_factory=list)  # 1 = sampled by the policy, 0 = environment
    conversation: list[dict] = field(default_factory=list)  # prompt + every turn, as the chat template renders it
    turns: list[Turn] = field(default_factory=list)
    stop: str = ""  # answer | done | max_turns | length | max_tokens | empty
    final_reward: float | None = None  # the environment's get_reward(), when it has one
    noncanonical_turns: list[int] = field(default_factory=list)  # see check_retokenization
    # strict=False: what the check would have raised (None: the rendering matches); counted, never raised
    rerender_mismatch: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def mask(self) -> list[int]:
        """Over ``token_ids``: 0 for the prompt and the environment's tokens, 1 for the policy's."""
        return [0] * len(self.prompt_ids) + self.completion_mask

    @property
    def completion(self) -> list[dict]:
        """The messages after the prompt: trl's conversational completion, what reward sources are given."""
        return self.conversation[len(self.prompt):]

    @property
    def malformed_calls(self) -> int:
        return sum(1 for turn in self.turns if turn.parsed.malformed)

    @property
    def turn_rewards(self) -> list[float | None]:
        return [turn.reward for turn in self.turns]

    @property
    def turn_ends(self) -> list[int]:
        """Index in ``completion_ids`` of each turn's last policy token: where a per-turn reward is placed (and the
        final one at the last), as a single-turn PPO places its score on the last response token."""
        ends, position = [], 0
        for turn in self.turns:
            position += len(turn.policy_ids)
            ends.append(position - 1)
            position += len(turn.env_ids)
        return ends

    def metrics(self) -> dict[str, float]:
        calls = sum(len(t.parsed.calls) for t in self.turns)
        return {"env/turns": float(len(self.turns)), "env/tool_calls": float(calls),
                "env/malformed_calls": float(self.malformed_calls),
                "env/tool_errors": float(sum(t.tool_errors for t in self.turns)),
                "env/tool_timeouts": float(sum(t.timed_out for t in self.turns)),
                "env/policy_tokens": float(sum(self.completion_mask)),
                "env/environment_tokens": float(len(self.completion_mask) - sum(self.completion_mask))}


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Per-step (or per-evaluation) means over a batch of episodes, in the metrics vocabulary (docs/metrics.md).

    ``env/tool_call_rate``: share of episodes with at least one well-formed tool call;
    ``env/malformed_call_rate``: share with at least one malformed call; ``env/rerender_mismatch_rate``: share
    whose chat-template rendering differs from the tokens played (``strict=False`` counts what strict raises);
    ``env/turns``: assistant turns per
    episode; and the mean of every :meth:`Episode.metrics` count (``env/tool_calls``, ``env/tool_errors``, ...).
    Empty for no episodes.
    """
    if not episodes:
        return {}
    n = len(episodes)
    means: dict[str, float] = {}
    for episode in episodes:
        for key, value in episode.metrics().items():
            means[key] = means.get(key, 0.0) + value / n
    calls = [sum(len(t.parsed.calls) for t in e.turns) for e in episodes]
    means["env/tool_call_rate"] = sum(1 for c in calls if c) / n
    means["env/malformed_call_rate"] = sum(1 for e in episodes if e.malformed_calls) / n
    means["env/rerender_mismatch_rate"] = sum(1 for e in episodes if e.rerender_mismatch) / n
    return means


class Renderer:
    """The chat template of one episode (its tools included), as text and as tokens."""

    def __init__(self, tokenizer, tools: list[dict] | None, chat_template: str | None = None):
        self.tokenizer, self.tools, self.chat_template = tokenizer, tools or None, chat_template

    def text(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt,
                                                  chat_template=self.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def first_prompt(row: dict, observation) -> list[dict]:
    """The row's prompt as messages, with reset()'s observation appended to the last one (trl's convention)."""
    prompt = row.get("prompt")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt or []]
    if not messages:
        messages = [{"role": "user", "content": ""}]
    if observation:
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
    return messages


def reply_tokens(renderer: Renderer, before: list[dict], replies: list[dict], end_of_turn: str, turn: int) -> list[int]:
    """The tokens of the environment's ``replies`` after the conversation ``before``, up to the next generation
    prompt: the rendering with them minus the rendering without, cut after the last end-of-turn token (a template
    may render a newline after the final turn only)."""
    head = renderer.text(before, generation_prompt=False)
    cut = head.rfind(end_of_turn)
    if cut >= 0:
        head = head[:cut + len(end_of_turn)]
    full = renderer.text(before + replies, generation_prompt=True)
    if not full.startswith(head):
        at = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        raise RetokenizationError(
            f"turn {turn}: the chat template renders the conversation before the environment's reply differently "
            f"once the reply is appended (character {at}: {head[at:at + 30]!r} becomes {full[at:at + 30]!r}); it is "
            "not prefix-preserving, so the reply's tokens cannot be cut out of it")
    return renderer.encode(full[len(head):])


def answer_calls(env_tools: dict[str, Callable], parsed: ParsedTurn, timeout: float, turn: Turn) -> list[dict]:
    """The `tool` messages answering a turn: one per call, or one error for a malformed turn."""
    if parsed.malformed:
        return [{"role": "tool", "name": "error", "content": error_text("malformed tool call: " +
                                                                       "; ".join(parsed.errors))}]
    replies = []
    for call in parsed.calls:
        tool = env_tools.get(call.name)
        problem = (f"unknown tool {call.name!r}; tools: {', '.join(sorted(env_tools)) or 'none'}" if tool is None
                   else bad_arguments(tool, call.arguments))
        if problem is None:
            outcome = call_with_timeout(tool, call.arguments, timeout)
            turn.tool_seconds += outcome.seconds
            turn.timed_out += int(outcome.timed_out)
            problem = None if outcome.ok else outcome.error
        if problem is None:
            content = result_text(outcome.value)
        else:
            turn.tool_errors += 1
            content = error_text(f"{call.name}: {problem}")
        replies.append({"role": "tool", "name": call.name, "content": content})
    return replies


def take_step(step: Callable, action: str, timeout: float, turn: Turn, name: str) -> StepResult:
    """``step(action)`` under the time limit: one that raises or hangs (a move it cannot read, say) is answered with
    an error observation and no reward, like a failed tool call; one that returns no (observation, reward, done)
    breaks the contract and is an EnvError."""
    outcome = call_with_timeout(lambda: step(action), {}, timeout)  # positional: the parameter may have any name
    turn.tool_seconds += outcome.seconds
    if not outcome.ok:
        turn.tool_errors += 1
        turn.timed_out += int(outcome.timed_out)
        return StepResult(error_text(f"step: {outcome.error}"), None, False)
    try:
        observation, reward, done = outcome.value
    except (TypeError, ValueError):
        raise EnvError(f"{name}.step returned {outcome.value!r}, not (observation, reward, done)") from None
    return StepResult(observation, None if reward is None else float(reward), bool(done))


class Play:
    """One episode in progress, fed one policy turn at a time: :func:`run_episode` for one, :func:`run_episodes`
    for a batch whose turns are generated together."""

    def __init__(self, tokenizer, env, row: dict, *, max_turns: int = 4, tool_timeout: float = 10.0,
                 max_tokens: int | None = None, chat_template: str | None = None,
                 end_token_ids: set[int] | None = None):
        from policies.tokens import end_token_ids as tokenizer_end_ids

        self.env, self.max_turns, self.tool_timeout, self.max_tokens = env, max_turns, tool_timeout, max_tokens
        self.ends = set(end_token_ids) if end_token_ids is not None else tokenizer_end_ids(tokenizer)
        self.renderer = Renderer(tokenizer, tool_schemas(env), chat_template)
        self.tools = tools_of(env)
        self.step = env.step if callable(getattr(env, "step", None)) else None
        prompt = first_prompt(row, env.reset(**row))
        self.episode = Episode(prompt=prompt, conversation=list(prompt),
                               prompt_ids=self.renderer.encode(self.renderer.text(prompt, generation_prompt=True)))

    @property
    def done(self) -> bool:
        return bool(self.episode.stop)

    def feed(self, new: Sequence[int]) -> None:
        """The policy's next turn (its tokens as sampled): parse it, answer it, append the reply's tokens."""
        episode, index = self.episode, len(self.episode.turns)
        new = [int(t) for t in new]
        if not new:
            episode.stop = "empty"
            return
        text = self.renderer.decode(new)
        closed = new[-1] in self.ends
        end_of_turn = self.renderer.decode(new[-1:]) if closed else None
        parsed = parse_assistant(text, end_of_turn)
        turn = Turn(index, new, text, parsed, closed)
        episode.turns.append(turn)
        episode.completion_ids += new
        episode.completion_mask += [1] * len(new)
        before = episode.conversation + [parsed.as_message()]
        episode.conversation = before
        episode.stop = self.answer(turn)
        if episode.stop:
            return
        # no reply (step() observed nothing) still opens the next assistant turn: the generation prompt
        ids = reply_tokens(self.renderer, before, turn.replies, end_of_turn, index)
        if self.max_tokens is not None and len(episode.token_ids) + len(ids) >= self.max_tokens:
            episode.stop = "max_tokens"
            return
        turn.env_ids = ids
        episode.conversation = before + turn.replies
        episode.completion_ids += ids
        episode.completion_mask += [0] * len(ids)

    def answer(self, turn: Turn) -> str:
        """Fill ``turn.replies`` (and its reward); the reason the episode stops here, or "" to go on."""
        if not turn.closed:
            return "length"
        if turn.parsed.calls or turn.parsed.malformed:
            turn.replies = answer_calls(self.tools, turn.parsed, self.tool_timeout, turn)
        elif self.step is not None:
            observation, turn.reward, done = take_step(self.step, turn.parsed.raw, self.tool_timeout, turn,
                                                       type(self.env).__name__)
            if done:
                return "done"
            turn.replies = [] if observation is None else [{"role": "user", "content": str(observation)}]
        else:
            return "answer"
        # the last turn's replies stay in turn.replies: the policy would never read them
        return "max_turns" if turn.index == self.max_turns - 1 else ""

    def finish(self, strict: bool = True) -> Episode:
        """The episode, with the environment's final reward and (``strict``) the re-tokenisation check."""
        get_reward = getattr(self.env, "get_reward", None)
        if callable(get_reward):
            self.episode.final_reward = float(get_reward())
        try:
            self.episode.noncanonical_turns = check_retokenization(self.episode, self.renderer)
        except Exception as exc:  # noqa: BLE001 - not strict: a rendering that fails is recorded like one that differs
            if strict:
                raise
            # trained on as sampled either way; the count says how often the template would render otherwise
            self.episode.rerender_mismatch = str(exc) if isinstance(exc, RetokenizationError) else \
                f"the chat template could not render the episode: {type(exc).__name__}: {exc}"
        return self.episode


def run_episode(generate: Callable[[list[int]], Sequence[int]], tokenizer, env, row: dict, *, strict: bool = True,
                **options) -> Episode:
    """Play one episode of ``env`` (already built, not yet reset) from dataset ``row``.

    ``generate(token_ids)`` returns the policy's new tokens for the sequence so far (the caller samples and
    stops at an end-of-turn token or a length).  ``options``: ``max_turns`` (4), ``tool_timeout`` (10 s),
    ``max_tokens`` (the whole sequence's cap, the model's positions: a reply that would pass it ends the episode
    before it is appended), ``chat_template``, ``end_token_ids``.
    """
    play = Play(tokenizer, env, row, **options)
    while not play.done:
        play.feed(generate(play.episode.token_ids))
    return play.finish(strict)


def run_episodes(generate: Callable[[list[list[int]]], Sequence[Sequence[int]]], tokenizer, envs, rows, *,
                 strict: bool = True, **options) -> list[Episode]:
    """A batch of episodes whose turns are generated together: ``generate(list of token ids)`` returns the new
    tokens of each (a batched or vLLM sampler); episodes that stop drop out of the next batch."""
    plays = [Play(tokenizer, env, row, **options) for env, row in zip(envs, rows, strict=True)]
    while active := [play for play in plays if not play.done]:
        outputs = list(generate([play.episode.token_ids for play in active]))
        if len(outputs) != len(active):
            raise EnvError(f"generate returned {len(outputs)} sequences for {len(active)} episodes")
        for play, new in zip(active, outputs):
            play.feed(new)
    return [play.finish(strict) for play in plays]


def segments(episode: Episode) -> list[tuple[str, int, list[int]]]:
    """(who, turn, tokens) in order: the prompt, then each turn's policy tokens and environment tokens."""
    parts = [("prompt", 0, episode.prompt_ids)]
    for turn in episode.turns:
        parts.append(("policy", turn.index, turn.policy_ids))
        if turn.env_ids:
            parts.append(("environment", turn.index, turn.env_ids))
    return parts


def check_retokenization(episode: Episode, renderer: Renderer) -> list[int]:
    """Raise :class:`RetokenizationError`, naming the turn, unless the chat template's rendering of the episode's
    conversation is the episode: the same text segment by segment, and the same tokens outside the policy's.

    The policy's own tokens are the sampled ones and may not be the tokenizer's canonical encoding of their text
    (a byte-level BPE can spell one text several ways): that is no drift, since training uses the sampled tokens;
    the turns where it happens are returned (``Episode.noncanonical_turns``).
    """
    parts = segments(episode)
    ends_open = parts[-1][0] != "policy"  # the prompt or a reply: it ends with the generation prompt
    full = renderer.text(episode.conversation, generation_prompt=ends_open)
    position, canonical = 0, []
    noncanonical = []
    for who, turn, ids in parts:
        text = renderer.decode(ids)
        if not full.startswith(text, position):
            at = position + next((i for i, (a, b) in enumerate(zip(text, full[position:])) if a != b),
                                 min(len(text), len(full) - position))
            raise RetokenizationError(
                f"{_where(who, turn)}: the episode's tokens are not the chat template's rendering of its "
                f"conversation: at character {at} the episode has {text[at - position:][:30]!r}, the template "
                f"renders {full[at:at + 30]!r}")
        position += len(text)
        again = renderer.encode(text)
        if again != list(ids):
            if who != "policy":
                raise RetokenizationError(f"{_where(who, turn)}: re-encoding their text gives other tokens")
            noncanonical.append(turn)
        canonical += again
    rest = full[position:]
    last = episode.turns[-1] if episode.turns else None
    if rest.strip() and not (last is not None and not last.closed and rest.strip() in _end_texts(renderer)):
        raise RetokenizationError(f"turn {last.index if last else 0}: the chat template renders {rest[:30]!r} after "
                                  "the episode's last token")
    reference = renderer.encode(full[:position])
    if reference != canonical:
        at = next((i for i, (a, b) in enumerate(zip(reference, canonical)) if a != b), min(len(reference),
                                                                                       len(canonical)))
        raise RetokenizationError(f"turn {_turn_at(episode, at)}: the whole conversation encodes differently from "
                                  f"its turns one by one (token {at}): tokens merge across a turn boundary")
    return noncanonical


def _where(who: str, turn: int) -> str:
    return "the prompt" if who == "prompt" else f"turn {turn} ({who} tokens)"


def _end_texts(renderer: Renderer) -> set[str]:
    from policies.tokens import END_OF_TURN_TOKENS

    return set(END_OF_TURN_TOKENS) | {renderer.tokenizer.eos_token or ""}


def _turn_at(episode: Episode, token: int) -> int:
    """The turn whose segment holds canonical token index ``token`` (approximate after a non-canonical turn)."""
    seen = 0
    for _, turn, ids in segments(episode):
        seen += len(ids)
        if token < seen:
            return turn
    return episode.turns[-1].index if episode.turns else 0


def sampler(model, temperature: float = 1.0, max_new_tokens: int = 32, end_token_ids: set[int] | None = None,
            seed: int | None = None) -> Callable[[list[int]], list[int]]:
    """A ``generate`` for :func:`run_episode` from a causal LM (transformers' generate, one sequence): for tests
    and the CLI; a training loop brings its own (batched, vLLM)."""
    import torch

    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def generate(token_ids: list[int]) -> list[int]:
        ids = torch.tensor([token_ids], device=model.device)
        new: list[int] = []
        past = None
        with torch.no_grad():
            for _ in range(max_new_tokens):
                out = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
                past = out.past_key_values
                probs = torch.softmax(out.logits[0, -1].float() / temperature, dim=-1)
                token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
                new.append(token)
                if end_token_ids and token in end_token_ids:
                    break
                ids = torch.cat([ids, torch.tensor([[token]], device=model.device)], dim=1)
        return new

    return generate


__all__ = ["Episode", "Play", "Renderer", "Turn", "check_retokenization", "episode_metrics", "run_episode",
           "run_episodes", "sampler", "segments"]
