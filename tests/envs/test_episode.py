"""The multi-turn episode runner over a scripted `generate`: token in, token out, masks, malformed calls, time limits,
step() environments and the strict re-tokenisation check."""

import time

import pytest
import torch

from alignment.envs import RetokenizationError, StepResult, ToolBox, run_episode
from alignment.envs.base import EnvironmentSpec, load_factory

ROW = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": 5}
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>'


def scripted(tokenizer, turns):
    """A `generate` that answers turn k with the tokens of turns[k], recording what it was given."""
    seen = []

    def generate(token_ids):
        seen.append(list(token_ids))
        return tokenizer(turns[len(seen) - 1], add_special_tokens=False)["input_ids"]

    generate.seen = seen
    return generate


@pytest.fixture
def calculator():
    return load_factory(EnvironmentSpec("examples/envs/calculator.py:Calculator"))


def test_tokens_as_sampled_and_environment_tokens_masked(tiny_tokenizer, calculator):
    generate = scripted(tiny_tokenizer, [CALL, "5<|im_end|>"])
    episode = run_episode(generate, tiny_tokenizer, calculator(), ROW)
    first, second = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in (CALL, "5<|im_end|>"))
    reply = tiny_tokenizer("<|im_start|>tool\n5<|im_end|><|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert episode.completion_ids == first + reply + second
    assert episode.completion_mask == [1] * len(first) + [0] * len(reply) + [1] * len(second)
    assert episode.mask == [0] * len(episode.prompt_ids) + episode.completion_mask
    # the policy was given exactly the episode's tokens so far, each time
    assert generate.seen == [episode.prompt_ids, episode.prompt_ids + first + reply]
    assert episode.stop == "answer" and episode.turns[0].replies == [{"role": "tool", "name": "add", "content": "5"}]
    assert episode.completion[-1] == {"role": "assistant", "content": "5"}
    assert tiny_tokenizer.decode(episode.prompt_ids).startswith("<|im_start|>system\n<tools>\nadd(a: integer")


def test_malformed_calls_are_counted_and_fed_back(tiny_tokenizer, calculator):
    turns = ['<tool_call>{"name": "add", "arguments": {"a": 2</tool_call><|im_end|>',  # not JSON
             '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}<|im_end|>',  # not closed
             '<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>',  # no such tool
             "5<|im_end|>"]
    episode = run_episode(scripted(tiny_tokenizer, turns), tiny_tokenizer, calculator(), ROW, max_turns=4)
    assert episode.malformed_calls == 2
    replies = [turn.replies[0]["content"] for turn in episode.turns[:3]]
    assert "malformed tool call: the call is not valid JSON" in replies[0]
    assert "<tool_call> is not closed by </tool_call>" in replies[1]
    assert "unknown tool 'multiply'; tools: add, evaluate" in replies[2]
    assert episode.turns[2].tool_errors == 1
    text = tiny_tokenizer.decode(episode.token_ids)
    assert all(reply in text for reply in replies)  # the policy saw every error
    assert episode.stop == "answer" and episode.metrics()["env/malformed_calls"] == 2.0


def test_a_call_that_hangs_is_cut_at_its_time_limit(tiny_tokenizer):
    def wait(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "woke"

    turns = ['<tool_call>{"name": "wait", "arguments": {"seconds": 30}}</tool_call><|im_end|>',
             '<tool_call>{"name": "wait", "arguments": {"seconds": 0}}</tool_call><|im_end|>', "done<|im_end|>"]
    started = time.perf_counter()
    episode = run_episode(scripted(tiny_tokenizer, turns), tiny_tokenizer, ToolBox([wait]), ROW, tool_timeout=0.3)
    assert time.perf_counter() - started < 5
    assert episode.turns[0].timed_out == 1 and 0.3 <= episode.turns[0].tool_seconds < 2
    assert episode.turns[0].replies[0]["content"] == '{"error": "wait: timed out after 0.3 s"}'
    assert episode.turns[1].replies[0]["content"] == "woke" and episode.turns[1].timed_out == 0


def test_tool_errors_and_wrong_arguments_become_observations(tiny_tokenizer, calculator):
    turns = ['<tool_call>{"name": "evaluate", "arguments": {"expression": "__import__(\'os\')"}}</tool_call><|im_end|>',
             '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><|im_end|>', "ok<|im_end|>"]
    episode = run_episode(scripted(tiny_tokenizer, turns), tiny_tokenizer, calculator(), ROW)
    assert episode.turns[0].replies[0]["content"].startswith('{"error": "evaluate: ValueError: not arithmetic')
    assert episode.turns[1].replies[0]["content"] == '{"error": "add: missing a required argument: \'b\'"}'
    assert [t.tool_errors for t in episode.turns] == [1, 1, 0]


class Guess:
    """A step() environment: guess the row's answer; 'higher'/'lower' until right (reward per turn)."""

    def reset(self, **row):
        self.answer = row["answer"]
        return " Guess it."

    def step(self, action: str):
        guess = int(action.strip())
        if guess == self.answer:
            return StepResult(None, 1.0, True)
        return StepResult("higher" if guess < self.answer else "lower", -0.1, False)

    def get_reward(self) -> float:
        return 2.0


class Silent(Guess):
    def step(self, action: str):
        return StepResult(None, 0.5, int(action.strip()) == self.answer)


def test_a_step_without_observation_still_opens_the_next_turn(tiny_tokenizer):
    episode = run_episode(scripted(tiny_tokenizer, ["3<|im_end|>", "5<|im_end|>"]), tiny_tokenizer, Silent(), ROW)
    header = tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert episode.turns[0].replies == [] and episode.turns[0].env_ids == header
    assert episode.stop == "done" and episode.turn_rewards == [0.5, 0.5]


def test_an_empty_generation_ends_the_episode(tiny_tokenizer, calculator):
    episode = run_episode(lambda ids: [], tiny_tokenizer, calculator(), ROW)
    assert episode.stop == "empty" and episode.completion_ids == [] and episode.turns == []
    episode = run_episode(scripted(tiny_tokenizer, [CALL, ""]), tiny_tokenizer, calculator(), ROW)
    assert episode.stop == "empty" and episode.completion_mask[-1] == 0


def test_a_step_that_cannot_read_the_move_is_an_error_observation(tiny_tokenizer):
    episode = run_episode(scripted(tiny_tokenizer, ["five<|im_end|>", "5<|im_end|>"]), tiny_tokenizer, Guess(), ROW)
    assert episode.turns[0].replies == [{"role": "user", "content": '{"error": "step: ValueError: invalid literal '
                                                                    "for int() with base 10: 'five'\"}"}]
    assert episode.turn_rewards == [None, 1.0] and episode.turns[0].tool_errors == 1 and episode.stop == "done"


def test_step_environment_rewards_each_turn(tiny_tokenizer):
    episode = run_episode(scripted(tiny_tokenizer, ["3<|im_end|>", "9<|im_end|>", "5<|im_end|>"]), tiny_tokenizer,
                          Guess(), ROW)
    assert episode.turn_rewards == [-0.1, -0.1, 1.0] and episode.stop == "done" and episode.final_reward == 2.0
    ends = episode.turn_ends
    assert [episode.completion_mask[i] for i in ends] == [1, 1, 1]
    assert [episode.completion_ids[i] for i in ends] == [tiny_tokenizer.eos_token_id] * 3
    assert ends[-1] == len(episode.completion_ids) - 1 and episode.completion_mask[ends[0] + 1] == 0
    assert episode.prompt[-1]["content"] == "What is 2 + 3? Guess it."  # reset()'s observation
    assert [t.replies for t in episode.turns[:2]] == [[{"role": "user", "content": "higher"}],
                                                      [{"role": "user", "content": "lower"}]]


def test_max_turns_and_truncated_turns_end_the_episode(tiny_tokenizer, calculator):
    episode = run_episode(scripted(tiny_tokenizer, [CALL, CALL]), tiny_tokenizer, calculator(), ROW, max_turns=2)
    assert episode.stop == "max_turns" and len(episode.turns) == 2 and episode.turns[1].env_ids == []
    assert episode.completion_mask[-1] == 1  # the last reply is never appended: the policy would not see it
    truncated = run_episode(scripted(tiny_tokenizer, ['<tool_call>{"name": "ad']), tiny_tokenizer, calculator(), ROW)
    assert truncated.stop == "length" and truncated.completion_mask == [1] * len(truncated.completion_ids)


def test_strict_check_fails_on_a_template_that_drops_a_newline_between_turns(tiny_tokenizer, calculator):
    """A ChatML template that writes a newline after a tool turn only when it is the last message: the reply cut
    out while the episode runs carries that newline, the full conversation drops it between the turns."""
    from policies.tiny import CHAT_TEMPLATE

    def newline_after_last(role_test):
        changed = CHAT_TEMPLATE.replace(
            "{{- '<|im_end|>' -}}\n{%- endif -%}\n{%- endfor -%}",
            "{{- '<|im_end|>' -}}\n{%- endif -%}\n{%- if loop.last" + role_test + " -%}{{- '\\n' -}}{%- endif -%}\n"
            "{%- endfor -%}")
        assert changed != CHAT_TEMPLATE
        return changed

    dropping = newline_after_last(" and message['role'] == 'tool'")
    with pytest.raises(RetokenizationError, match=r"^turn 0 \(environment tokens\): .* the episode has "
                                                  r"'\\n<\|im_start\|>assistant\\n', the template renders "
                                                  r"'<\|im_start\|>assistant\\n5"):
        run_episode(scripted(tiny_tokenizer, [CALL, "5<|im_end|>"]), tiny_tokenizer, calculator(), ROW,
                    chat_template=dropping)
    with pytest.raises(RetokenizationError, match=r"^the prompt: "):  # the same drop after the user's turn
        run_episode(scripted(tiny_tokenizer, [CALL, "5<|im_end|>"]), tiny_tokenizer, calculator(), ROW,
                    chat_template=newline_after_last(""))
    # without the check the episode runs (and would train on a context the template never renders)
    episode = run_episode(scripted(tiny_tokenizer, [CALL, "5<|im_end|>"]), tiny_tokenizer, calculator(), ROW,
                          chat_template=dropping, strict=False)
    assert "<|im_end|>\n<|im_start|>assistant" in tiny_tokenizer.decode(episode.token_ids)
    # ... and counts what strict would have raised, so a run with strict: false still shows the drift
    assert episode.rerender_mismatch.startswith("turn 0 (environment tokens): ")
    from alignment.envs.episode import episode_metrics

    clean = run_episode(scripted(tiny_tokenizer, [CALL, "5<|im_end|>"]), tiny_tokenizer, calculator(), ROW,
                        strict=False)
    assert clean.rerender_mismatch is None
    assert episode_metrics([episode, clean])["env/rerender_mismatch_rate"] == 0.5


def test_strict_check_flags_a_call_not_in_the_templates_form(tiny_tokenizer, calculator):
    """Valid JSON spelled differently from the template's form: it runs, but a server re-rendering the parsed call
    would show the model other text, so the strict check names the turn."""
    spaced = '<tool_call>{"name":"add","arguments":{"a":2,"b":3}}</tool_call><|im_end|>'
    with pytest.raises(RetokenizationError, match=r"turn 0 \(policy tokens\)"):
        run_episode(scripted(tiny_tokenizer, [spaced, "5<|im_end|>"]), tiny_tokenizer, calculator(), ROW)


def test_non_canonical_policy_tokens_are_kept_and_reported(tiny_tokenizer, calculator):
    """The policy may spell a text with other tokens than the tokenizer would: kept as sampled, not an error."""
    canonical = tiny_tokenizer("What 5<|im_end|>", add_special_tokens=False)["input_ids"]
    spelled = [i for ch in "What 5" for i in tiny_tokenizer(ch, add_special_tokens=False)["input_ids"]] + canonical[-1:]
    assert spelled != canonical and tiny_tokenizer.decode(spelled) == tiny_tokenizer.decode(canonical)
    episode = run_episode(lambda ids: spelled, tiny_tokenizer, calculator(), ROW)
    assert episode.completion_ids == spelled and episode.noncanonical_turns == [0]


def test_environment_positions_change_neither_masked_loss_nor_masked_kl(tiny_tokenizer, calculator):
    """Nonsense logits at every environment position: the masked token-level loss and KL (alignment.ppo.losses)
    are unchanged, and their gradient there is exactly zero; the mask is the episode runner's."""
    from alignment.ppo.losses import clipped_policy_loss, kl_estimate, logprobs_from_logits, masked_mean

    episode = run_episode(scripted(tiny_tokenizer, [CALL, "5<|im_end|>"]), tiny_tokenizer, calculator(), ROW)
    tokens = torch.tensor(episode.completion_ids)
    mask = torch.tensor(episode.completion_mask)
    assert 0 < mask.sum() < len(mask)
    vocab = len(tiny_tokenizer)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(tokens), vocab, generator=generator)
    ref_logits = torch.randn(len(tokens), vocab, generator=generator)
    old_logp = logprobs_from_logits(logits, tokens).detach() - 0.05
    advantages = torch.randn(len(tokens), generator=generator)

    def loss_and_kl(policy_logits):
        logp = logprobs_from_logits(policy_logits, tokens)
        ref_logp = logprobs_from_logits(ref_logits, tokens)
        loss, _, _ = clipped_policy_loss(logp, old_logp, advantages, mask)
        # k3 exponentiates: at an environment position log r can pass 88 (exp overflows), and although masked_mean
        # drops the value, 0 * inf is a NaN gradient; so the KL's inputs are masked before the estimator too
        safe_logp = torch.where(mask.bool(), logp, ref_logp)
        kl = masked_mean(kl_estimate(safe_logp, ref_logp, "k3"), mask)
        return loss, kl

    nonsense = logits.clone()  # huge, finite (a NaN logit would be a broken forward, not an environment token)
    nonsense[mask == 0] = torch.randn(int((mask == 0).sum()), vocab, generator=generator) * 1e4
    nonsense[(mask == 0).nonzero()[::2, 0], :7] = 1e30
    nonsense.requires_grad_(True)
    loss, kl = loss_and_kl(logits)
    loss_n, kl_n = loss_and_kl(nonsense)
    assert torch.isfinite(loss_n) and torch.isfinite(kl_n)
    assert torch.equal(loss, loss_n) and torch.equal(kl, kl_n)
    # and they are the loss and KL of the policy's tokens alone
    policy = mask.bool()
    alone, _, _ = clipped_policy_loss(logprobs_from_logits(logits, tokens)[policy], old_logp[policy],
                                      advantages[policy], torch.ones(int(policy.sum())))
    assert torch.allclose(loss, alone, atol=1e-7, rtol=0)
    kl_alone = kl_estimate(logprobs_from_logits(logits, tokens)[policy],
                           logprobs_from_logits(ref_logits, tokens)[policy], "k3").mean()
    assert torch.allclose(kl, kl_alone, atol=1e-6, rtol=0) and kl > 0
    (loss_n + kl_n).backward()
    assert torch.all(nonsense.grad[mask == 0] == 0) and nonsense.grad[mask == 1].abs().sum() > 0


def test_a_sampled_tiny_model_passes_the_strict_check(calculator):
    """Real sampling (tiny:1m, random weights): whatever it writes, the tokens are the ones it sampled and the
    strict check holds (non-canonical spellings reported, not raised)."""
    import policies
    from alignment.envs import sampler
    from policies.tokens import end_token_ids

    model, tokenizer = policies.load("tiny:1m", seed=0)
    ends = end_token_ids(tokenizer, model)
    for seed in range(4):
        generate = sampler(model, temperature=1.5, max_new_tokens=12, end_token_ids=ends, seed=seed)
        episode = run_episode(generate, tokenizer, calculator(), ROW, max_turns=2)
        policy_tokens = [t for turn in episode.turns for t in turn.policy_ids]
        assert [t for t, m in zip(episode.completion_ids, episode.completion_mask) if m] == policy_tokens
        assert episode.stop in ("answer", "length", "max_turns")


def test_a_batch_of_episodes_matches_each_played_alone(tiny_tokenizer, calculator):
    """run_episodes generates turn k of every live episode in one call; the episodes are the ones run alone."""
    from alignment.envs import run_episodes

    scripts = [[CALL, "5<|im_end|>"], ["5<|im_end|>"], [CALL, CALL, "5<|im_end|>"]]
    batches = []

    def generate(batch):
        batches.append(len(batch))
        live = [s for s in scripts_left if s]
        return [tiny_tokenizer(s.pop(0), add_special_tokens=False)["input_ids"] for s in live]

    scripts_left = [list(s) for s in scripts]
    together = run_episodes(generate, tiny_tokenizer, [calculator() for _ in scripts], [ROW] * 3)
    assert batches == [3, 2, 1]
    for script, episode in zip(scripts, together):
        alone = run_episode(scripted(tiny_tokenizer, script), tiny_tokenizer, calculator(), ROW)
        assert (episode.token_ids, episode.mask, episode.stop) == (alone.token_ids, alone.mask, alone.stop)
