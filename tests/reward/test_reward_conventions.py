"""trl's calling convention (by keyword), every trl.rewards function as a source, verl and OpenRLHF forms."""

import asyncio

import pytest

from alignment.errors import RewardError
from reward.base import RewardSource, call_plan
from reward.combine import build, build_source
from reward.conventions import detect_convention

P = ["What is 1 + 6?", "What is 2 + 2?", "x"]
C = ["<think>add</think>The answer is $7$", "<think>hm</think>$5$", "$3$"]
ANSWERS = ["$7$", "$4$", "no math here"]
IDS = [[1] * 4, [1] * 8, [1]]


# ------------------------------------------------------------------ trl's convention


def test_trl_example_from_the_issue_runs_as_a_recipe_source():
    src = build_source({"source": "trl.rewards:think_format_reward"})
    assert src.name == "think_format_reward" and src.input_format == "messages"
    assert src(P, C) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"source": "trl.rewards:think_format_reward"}, [1.0, 1.0, 0.0]),
        ({"source": "trl.rewards:accuracy_reward", "columns": {"solution": "answer"}}, [1.0, 0.0, None]),
        ({"source": "trl.rewards:reasoning_accuracy_reward", "columns": {"solution": "answer"}}, [1.0, 0.0, 0.0]),
        # cosine: correct at 4/8 tokens -> 0.5 + 0.25 * (1 + cos(pi/2)) = 0.75; wrong at 8/8 -> -0.5
        ({"source": "trl.rewards:get_cosine_scaled_reward", "factory": True, "kwargs": {"max_len": 8},
          "columns": {"solution": "answer"}}, [0.75, -0.5, None]),
        # bigrams of [1]*n: n - 1, one distinct -> -1 * (1 - 1/(n-1)); one token holds no bigram -> 0
        ({"source": "trl.rewards:get_repetition_penalty_reward", "factory": True,
          "kwargs": {"ngram_size": 2, "max_penalty": -1.0}}, [pytest.approx(-2 / 3), pytest.approx(-6 / 7), 0.0]),
        # overlong: 8 tokens with max 6 -> past the limit, -1; 4 tokens fits in max - cache = 4 -> 0
        ({"source": "trl.rewards:get_soft_overlong_punishment", "factory": True,
          "kwargs": {"max_completion_len": 6, "soft_punish_cache": 2}}, [0.0, -1.0, 0.0]),
    ],
    ids=lambda v: v["source"].split(":")[1] if isinstance(v, dict) else None,
)
def test_every_trl_reward_function_is_a_source(spec, expected):
    src = build_source(spec)
    assert src(P, C, answer=ANSWERS, completion_ids=IDS) == expected


def test_every_function_trl_rewards_exports_is_covered():
    import trl.rewards

    covered = {"think_format_reward", "accuracy_reward", "reasoning_accuracy_reward", "get_cosine_scaled_reward",
               "get_repetition_penalty_reward", "get_soft_overlong_punishment"}
    exported = {name for names in trl.rewards._import_structure.values() for name in names}
    assert exported == covered


def test_sources_are_called_by_keyword_with_what_trl_passes():
    seen = {}

    def reward(completions, completion_ids, trainer_state, log_extra, answer):
        seen.update(completions=completions, ids=completion_ids, state=trainer_state, answer=answer)
        log_extra("note", ["a", "b"])
        return [float(len(i)) for i in completion_ids]

    logged = {}
    src = RewardSource(reward, name="kw")
    out = src(prompts=["p", "q"], completions=["a", "b"], completion_ids=[[1, 2], [3]], answer=[1, 2],
              trainer_state="STATE", log_extra=lambda k, v: logged.setdefault(k, v), log_metric=print)
    assert out == [2.0, 1.0]
    assert seen == {"completions": ["a", "b"], "ids": [[1, 2], [3]], "state": "STATE", "answer": [1, 2]}
    assert logged == {"note": ["a", "b"]}


def test_a_function_without_prompts_gets_none_and_a_missing_argument_is_named():
    src = RewardSource(lambda completions, completion_ids: [0.0] * len(completions), name="ids")
    with pytest.raises(RewardError, match=r"'ids' needs argument\(s\) \['completion_ids'\].*sampled token ids"):
        src(["p"], ["a"])


def test_a_trainer_argument_missing_outside_trl_is_named_as_such():
    src = RewardSource(lambda completions, trainer_state: [0.0] * len(completions), name="needs_state")
    with pytest.raises(RewardError, match=r"needs argument\(s\) \['trainer_state'\].*trl's trainers pass these"):
        src(["p"], ["a"])


def test_older_positional_form_is_kept_only_where_trl_could_not_call_the_function():
    assert call_plan(lambda p, c: []).positional
    assert call_plan(lambda p, c, /, **kw: []).positional
    assert not call_plan(lambda prompts, completions, **kw: []).positional
    assert not call_plan(lambda completions, answer: []).positional  # trl's names: by keyword
    assert RewardSource(lambda p, c: [len(x) * 1.0 for x in c], name="old")(["p"], ["abc"]) == [3.0]


def test_async_reward_function_and_none_for_does_not_apply():
    async def maybe(completions, **kwargs):
        await asyncio.sleep(0)
        return [None if c == "skip" else 1.0 for c in completions]

    assert RewardSource(maybe, name="async")(["p", "q"], ["skip", "x"]) == [None, 1.0]


def test_recipe_built_source_names_the_failing_sample_under_the_default_timeout(tmp_path):
    path = tmp_path / "fragile.py"
    path.write_text("def fragile(prompts, completions, **kwargs):\n"
                    "    return [1.0 / (len(c) - 3) for c in completions]  # a 3-letter completion divides by 0\n")
    src = build_source({"source": f"{path}:fragile"})  # built as a recipe builds it: 300 s default timeout
    assert src.timeout == 300.0 and src.on_error == "raise"
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError on sample 1 \(prompt 'What is 2 \+ 2\?'\)"):
        src(P, ["long one", "abc", "four"])


def test_a_sample_that_hangs_alone_stops_the_search_at_the_timeout():
    import time

    def hangs_on_b(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise ValueError("batch")
        if completions == ["b"]:
            time.sleep(1.0)
        return [1.0]

    src = RewardSource(hangs_on_b, name="hang", timeout=0.2)
    with pytest.raises(RewardError, match=r"batch of 3 samples \(samples 0..0 pass alone; search stopped\)"):
        src(["p"] * 3, ["a", "b", "c"])


# ------------------------------------------------------------------ verl and OpenRLHF forms


def verl_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if data_source == "rich":
        return {"score": float(solution_str.strip() == str(ground_truth)), "acc": 1}
    return float(solution_str.strip() == str(ground_truth)) + 0.5 * (extra_info or {}).get("bonus", 0)


def openrlhf_reward_func(queries, prompts, labels):
    return [float(q.endswith(str(label))) for q, label in zip(queries, labels)]


def test_detection_reads_only_complete_signatures():
    assert detect_convention(verl_compute_score) == "verl"
    assert detect_convention(openrlhf_reward_func) == "openrlhf"
    assert detect_convention(lambda solution_str, ground_truth, **kw: []) == "trl"  # data_source missing
    assert detect_convention(lambda queries, prompts, labels, completions: []) == "trl"  # trl's name present
    assert detect_convention(lambda prompts, completions, **kw: []) == "trl"


def test_verl_compute_score_float_and_dict_with_columns_renamed():
    from reward.conventions import adapt

    src = RewardSource(adapt(verl_compute_score, None, "v"), name="verl", columns={"ground_truth": "answer"})
    out = src(["a", "b", "c"], ["7", "8", "7"], answer=[7, 7, 7], data_source=["plain", "rich", "plain"],
              bonus=[0, 0, 1])
    assert out == [1.0, 0.0, 1.5]


def test_verl_dict_without_score_is_an_error_naming_the_sample():
    from reward.conventions import adapt

    src = RewardSource(adapt(lambda data_source, solution_str, ground_truth, extra_info: {"acc": 1}, "verl", "v"),
                       name="verl")
    with pytest.raises(RewardError, match="without 'score' for sample 0"):
        src(["a"], ["b"], ground_truth=[1])


def test_openrlhf_reward_func_rewards_and_logged_extras(tmp_path):
    path = tmp_path / "orl.py"
    path.write_text(
        "import torch\n"
        "def reward_func(queries, prompts, labels):\n"
        "    r = torch.tensor([float(q.endswith(str(l))) for q, l in zip(queries, labels)])\n"
        "    return {'rewards': r, 'scores': r, 'extra_logs': {'chars': torch.tensor([len(q) * 1.0 for q in queries])}}\n"
    )
    combined = build([{"source": f"{path}:reward_func", "columns": {"labels": "answer"}}])
    result = combined(["Q1 ", "Q2 "], ["7", "8"], answer=[7, 9])
    assert result.per_source["reward_func"] == [1.0, 0.0]
    assert result.metrics["reward/reward_func/scores"] == 0.5
    assert result.metrics["reward/reward_func/chars"] == 4.0


def test_explicit_convention_overrides_detection_and_a_wrong_one_fails_by_name():
    with pytest.raises(RewardError, match=r"convention' must be one of \('trl', 'verl', 'openrlhf'\)"):
        build_source({"source": "answer_match", "convention": "deepspeed"})

    def ambiguous(queries, prompts, labels, completions=None):  # names trl's 'completions': detected as trl
        return [float(q.endswith(str(label))) for q, label in zip(queries, labels)]

    assert detect_convention(ambiguous) == "trl"
    from reward.conventions import adapt

    src = RewardSource(adapt(ambiguous, "openrlhf", "amb"), name="amb", columns={"labels": "answer"})
    assert src(["Q "], ["7"], answer=[7]) == [1.0]
