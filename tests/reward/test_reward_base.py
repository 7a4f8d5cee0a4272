"""RewardSource: validation of scores, failure accounting, async, timeouts, conversational inputs."""

import asyncio
import logging
import math
import pickle
import time

import numpy as np
import pytest

from alignment.errors import RewardError
from reward import RewardSource
from reward.base import completion_text, data_columns, prompt_text, to_score

P = ["p0", "p1", "p2"]
C = ["c0", "c1", "c2"]


def const(values):
    def fn(prompts, completions, **kwargs):
        return list(values)

    return fn


def test_name_and_valid_scores_pass_through():
    src = RewardSource(const([1, 0.5, None]), name="mine")
    assert src.__name__ == "mine"
    out = src(P, C)
    assert out == [1.0, 0.5, None]
    assert all(type(x) is float for x in out if x is not None)
    assert src.stats.calls == 1 and src.stats.failures == 0


def test_numpy_and_tensor_scalars_are_numbers():
    import torch

    src = RewardSource(const([np.float32(0.25), np.int64(2), torch.tensor(1.5)]), name="np")
    assert src(P, C) == [0.25, 2.0, 1.5]
    src = RewardSource(lambda p, c: np.array([1.0, 2.0, 3.0]), name="arr")
    assert src(P, C) == [1.0, 2.0, 3.0]


def test_wrong_count_is_an_error_in_both_modes():
    for mode in ("raise", "skip"):
        src = RewardSource(const([1.0, 2.0]), name="short", on_error=mode)
        with pytest.raises(RewardError, match=r"'short': expected 3 scores, got 2"):
            src(P, C)


def test_not_a_list_is_an_error():
    with pytest.raises(RewardError, match="returned float, expected a list of 3 scores"):
        RewardSource(lambda p, c: 1.0, name="scalar")(P, C)
    with pytest.raises(RewardError, match="returned str"):
        RewardSource(lambda p, c: "111", name="text")(P, C)


@pytest.mark.parametrize(
    "bad, why",
    [
        (float("nan"), "NaN"),
        (float("inf"), "inf"),
        (-math.inf, "-inf"),
        ("0.5", "str"),
        (True, "bool"),
        (np.bool_(False), "bool"),
        ([1.0], "list"),
        (np.float64("nan"), "NaN"),
    ],
)
def test_invalid_score_raises_naming_source_and_sample(bad, why):
    src = RewardSource(const([1.0, bad, 0.0]), name="flaky")
    with pytest.raises(RewardError) as info:
        src(P, C)
    msg = str(info.value)
    assert "'flaky'" in msg and "sample 1" in msg and why in msg


def test_invalid_score_skipped_is_none_counted_and_logged(caplog):
    src = RewardSource(const([1.0, float("nan"), 0.0]), name="flaky", on_error="skip")
    with caplog.at_level(logging.WARNING, logger="reward"):
        out = src(P, C)
    assert out == [1.0, None, 0.0]  # never 0 for the NaN
    assert src.stats.invalid_scores == 1 and src.stats.skipped_samples == 1 and src.stats.failures == 1
    assert "flaky" in caplog.text and "sample 1" in caplog.text


def test_exception_names_source_and_the_failing_sample_and_is_chained():
    def picky(prompts, completions, **kwargs):
        for c in completions:
            if c == "c2":
                raise ValueError("cannot parse")
        return [0.0] * len(completions)

    src = RewardSource(picky, name="picky")
    with pytest.raises(RewardError, match=r"'picky' raised ValueError on sample 2 .*cannot parse") as info:
        src(P, C)
    assert isinstance(info.value.__cause__, ValueError)


def test_exception_in_skip_mode_fails_the_whole_batch(caplog):
    def broken(prompts, completions, **kwargs):
        raise KeyError("x")

    src = RewardSource(broken, name="broken", on_error="skip")
    with caplog.at_level(logging.WARNING, logger="reward"):
        assert src(P, C) == [None, None, None]
    assert src.stats.failures == 1 and src.stats.skipped_samples == 3
    assert "broken" in caplog.text and "KeyError" in caplog.text


def test_abort_after_consecutive_failures_and_reset_on_success():
    state = {"fail": True}

    def sometimes(prompts, completions, **kwargs):
        if state["fail"]:
            raise RuntimeError("down")
        return [1.0] * len(completions)

    src = RewardSource(sometimes, name="svc", on_error="skip", max_consecutive_failures=3)
    assert src(P, C) == [None] * 3
    assert src(P, C) == [None] * 3
    state["fail"] = False
    assert src(P, C) == [1.0] * 3  # success resets the streak
    assert src.stats.consecutive_failures == 0
    state["fail"] = True
    src(P, C)
    src(P, C)
    with pytest.raises(RewardError, match=r"'svc' failed 3 calls in a row"):
        src(P, C)
    assert src.stats.failures == 5 and src.stats.calls == 6


def test_repeated_invalid_scores_also_abort():
    src = RewardSource(
        const([float("nan"), 1.0, 1.0]), name="nan", on_error="skip", max_consecutive_failures=2
    )
    src(P, C)
    with pytest.raises(RewardError, match="2 calls in a row"):
        src(P, C)


def test_async_function_and_async_callable_class():
    async def coro(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    class AsyncScorer:
        async def __call__(self, prompts, completions, **kwargs):
            return [2.0] * len(completions)

    assert RewardSource(coro, name="a")(P, C) == [2.0, 2.0, 2.0]
    assert RewardSource(AsyncScorer(), name="b")(P, C) == [2.0, 2.0, 2.0]


def test_async_source_called_inside_a_running_loop():
    async def coro(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    src = RewardSource(coro, name="a")

    async def main():
        return src(P, C)

    assert asyncio.run(main()) == [1.0, 1.0, 1.0]


def test_timeout_raises_and_skip_mode_counts_it():
    def slow(prompts, completions, **kwargs):
        time.sleep(2)
        return [1.0] * len(completions)

    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"'slow' timed out after 0.2 s"):
        RewardSource(slow, name="slow", timeout=0.2)(P, C)
    src = RewardSource(slow, name="slow", timeout=0.2, on_error="skip")
    assert src(P, C) == [None, None, None]
    assert src.stats.failures == 1
    assert time.monotonic() - t0 < 1.5


def test_timeout_with_fast_function_returns_scores():
    assert RewardSource(const([1, 2, 3]), name="fast", timeout=5)(P, C) == [1.0, 2.0, 3.0]


def test_columns_are_filtered_to_what_the_function_names():
    seen = {}

    def strict(prompts, completions, answer):
        seen["answer"] = answer
        return [1.0] * len(completions)

    src = RewardSource(strict, name="strict")
    # trl adds trainer_state / log_extra / completion_ids: a strict signature must still work
    src(P, C, answer=[1, 2, 3], trainer_state=object(), completion_ids=[[1], [2], [3]])
    assert seen["answer"] == [1, 2, 3]
    with pytest.raises(RewardError, match=r"needs column\(s\) \['answer'\].*columns given: \['level'\]"):
        src(P, C, level=[1, 2, 3], trainer_state=None)


def test_var_kwargs_function_gets_everything():
    seen = {}

    def loose(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    RewardSource(loose, name="loose")(P, C, answer=[1, 2, 3], trainer_state="s")
    assert set(seen) == {"answer", "trainer_state"}


def test_conversational_inputs_are_normalised_before_user_code():
    seen = {}

    def record(prompts, completions, **kwargs):
        seen["p"], seen["c"] = prompts, completions
        return [0.0] * len(prompts)

    prompts = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 + 2?"}],
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "second"},
        ],
    ]
    completions = [
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}],
    ]
    RewardSource(record, name="r")(prompts, completions)
    assert seen == {"p": ["What is 2 + 2?", "second"], "c": ["4", "xy"]}
    assert prompt_text("plain") == "plain" and completion_text("plain") == "plain"


def test_unusable_input_names_source_and_sample():
    with pytest.raises(RewardError, match=r"'r': completion of sample 1 is a int"):
        RewardSource(const([0, 0]), name="r")(["a", "b"], ["x", 5])


def test_prompt_and_completion_counts_must_match():
    with pytest.raises(RewardError, match="3 prompts but 2 completions"):
        RewardSource(const([0, 0, 0]), name="r")(P, C[:2])


def test_empty_batch_returns_empty():
    assert RewardSource(const([]), name="r")([], []) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"on_error": "ignore"}, "on_error"),
        ({"weight": float("nan")}, "weight"),
        ({"timeout": 0}, "timeout"),
        ({"max_consecutive_failures": 0}, "max_consecutive_failures"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(RewardError, match=match):
        RewardSource(const([]), name="r", **kwargs)


def test_to_score_and_data_columns_helpers():
    assert to_score(3) == 3.0 and to_score(None) is None
    assert isinstance(to_score(float("nan")), str)
    assert data_columns({"answer": [1, 2], "trainer_state": [1, 2], "x": 5, "short": [1]}, 2) == {
        "answer": [1, 2]
    }


def test_picklable_with_a_module_level_function():
    src = RewardSource(to_score, name="p")
    clone = pickle.loads(pickle.dumps(src))
    assert clone.__name__ == "p"
