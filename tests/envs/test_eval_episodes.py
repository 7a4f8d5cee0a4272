"""Held-out episodes for evaluation: greedy and sampled, accuracy with and without a call, the carry split."""

from types import SimpleNamespace

import pytest
import torch

from alignment.envs import EnvironmentSpec
from alignment.envs.episode import Episode, Turn
from alignment.envs.tool_calls import ParsedTurn, ToolCall
from alignment.evaluation.episodes import merge_modes, play_eval_episodes, summarize_eval_episodes

CALL = ParsedTurn("", calls=(ToolCall("add", {"a": 1, "b": 2}),))
BROKEN = ParsedTurn("<tool_call>{", errors=("not JSON",))
ANSWER = ParsedTurn("= 3")


def episode(*parsed: ParsedTurn) -> Episode:
    turns = [Turn(index=i, policy_ids=[5], text=p.content, parsed=p, closed=True) for i, p in enumerate(parsed)]
    return Episode(prompt=[{"role": "user", "content": "q"}], prompt_ids=[1], completion_ids=[5] * len(turns),
                   completion_mask=[1] * len(turns), turns=turns)


def test_accuracy_with_and_without_a_call_hand_counted(tiny_tokenizer):
    # six episodes: three call (2 right), two answer directly (1 right), one malformed call (wrong, in neither)
    episodes = [episode(CALL, ANSWER), episode(CALL, ANSWER), episode(CALL, ANSWER),
                episode(ANSWER), episode(ANSWER), episode(BROKEN)]
    correct = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    carry = [True, True, False, True, False, False]
    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": 3, "carry": c} for c in carry]
    result = SimpleNamespace(per_source={"answer_match": correct}, total=correct, metrics={"reward/total": 0.5})
    metrics = summarize_eval_episodes(rows, episodes, result, tiny_tokenizer, transcripts=0, mode="sampled")
    assert metrics["sampled_accuracy"] == pytest.approx(3 / 6)
    assert metrics["sampled/accuracy_with_call"] == pytest.approx(2 / 3)
    assert metrics["sampled/accuracy_without_call"] == pytest.approx(1 / 2)
    assert metrics["sampled/env/tool_call_rate"] == pytest.approx(3 / 6)
    assert metrics["sampled/env/malformed_call_rate"] == pytest.approx(1 / 6)
    carried = metrics["by_carry"]["true"]  # rows 0, 1 (calls, right) and 3 (direct, right)
    assert carried["sampled/accuracy_with_call"] == 1.0 and carried["sampled/accuracy_without_call"] == 1.0
    assert metrics["by_carry"]["false"]["sampled/accuracy_with_call"] == 0.0  # row 2
    assert not any(key.startswith("greedy") for key in metrics)
    greedy = {"greedy_accuracy": 0.1, "num_prompts": 6, "by_carry": {"true": {"greedy_accuracy": 0.2}}}
    merge_modes(greedy, metrics)
    assert greedy["greedy_accuracy"] == 0.1 and greedy["sampled_accuracy"] == pytest.approx(0.5)
    assert greedy["by_carry"]["true"] == {"greedy_accuracy": 0.2, **carried}


def test_sampled_episodes_are_seeded_and_leave_the_callers_stream_alone(tmp_path):
    import json

    import policies
    from alignment.recipe import EvalSpec

    model, tokenizer = policies.load("tiny:1m")
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} + 5?"}],
                                        "answer": a + 5}) + "\n" for a in range(6)))
    spec = EvalSpec(data=str(data), max_new_tokens=6, batch_size=3, seed=3)
    environment = EnvironmentSpec("examples/envs/calculator.py:Calculator", max_turns=2, strict=False)

    def texts(greedy, seed=3):
        torch.manual_seed(123)
        played = play_eval_episodes(model, tokenizer, environment, EvalSpec(**{**vars(spec), "seed": seed}),
                                    greedy=greedy)[1]
        after = torch.rand(1).item()  # the caller's stream goes on from where it was
        return [tokenizer.decode(e.completion_ids) for e in played], after

    sampled, after = texts(False)
    assert texts(False) == (sampled, after)  # the same seed, the same episodes
    assert texts(False, seed=4)[0] != sampled
    torch.manual_seed(123)
    assert after == pytest.approx(torch.rand(1).item())  # sampling did not consume the caller's random numbers
    greedy, _ = texts(True)
    assert greedy == texts(True)[0] and greedy != sampled
