"""build(specs) -> CombinedReward: spec validation, weighted totals, metrics, trl's call pattern."""

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.errors import RewardError
from reward import CombinedReward, RewardSource, build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = "tests/reward/fixtures/my_reward.py"


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


SPECS = [
    {"source": "answer_match"},
    {"source": "length_target", "name": "brevity", "weight": 0.5, "kwargs": {"target": 4}},
    {"source": f"{FIXTURE}:starts_with_answer", "weight": 2.0},
]


def test_weighted_total_per_source_and_metrics_by_hand():
    combined = build(SPECS)
    assert [s.name for s in combined.sources] == ["answer_match", "brevity", "starts_with_answer"]
    assert combined.weights == [1.0, 0.5, 2.0]
    prompts = ["What is 2 + 2?", "What is 3 + 4?", "Say hi"]
    completions = ["4", "It is 8", "hi!!"]
    result = combined(prompts, completions, answer=[4, 7, None])
    assert result.per_source == {
        "answer_match": [1.0, 0.0, None],  # 4 == 4; 8 != 7; no answer
        "brevity": [-0.75, -0.75, 0.0],  # -|1-4|/4, -|7-4|/4, -|4-4|/4
        "starts_with_answer": [1.0, 0.0, None],
    }
    # sample 0: 1*1 + 0.5*-0.75 + 2*1 = 2.625 ; sample 1: 0 - 0.375 + 0 = -0.375 ; sample 2: 0.5*0 = 0
    assert result.total == [2.625, -0.375, 0.0]
    assert result.metrics["reward/answer_match"] == 0.5
    assert result.metrics["reward/brevity"] == -0.5
    assert result.metrics["reward/starts_with_answer"] == 0.5
    assert result.metrics["reward/answer_match/failures"] == 0.0
    assert result.metrics["reward/total"] == pytest.approx((2.625 - 0.375 + 0.0) / 3)


def test_no_source_applies_gives_none_and_no_mean():
    combined = build(["answer_match"])
    result = combined(["p", "p"], ["1", "2"], answer=[None, None])
    assert result.total == [None, None]
    assert "reward/answer_match" not in result.metrics and "reward/total" not in result.metrics


def test_skip_mode_failure_drops_the_samples_and_counts(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def flaky(prompts, completions, **kw):\n    raise RuntimeError('scorer down')\n")
    combined = build(["answer_match", {"source": f"{bad}:flaky", "on_error": "skip", "weight": 3.0}])
    result = combined(["p", "p"], ["4", "5"], answer=[4, 4])
    assert result.per_source["flaky"] == [None, None] and result.per_source["answer_match"] == [1.0, 0.0]
    # a failed source is neither 0 * weight nor left out of a sum that then reads as complete: no total
    assert result.total == [None, None] and result.dropped == [0, 1]
    assert result.metrics["reward/dropped_samples"] == 2.0
    assert result.metrics["reward/flaky/failures"] == 1.0 and result.metrics["reward/flaky/skipped"] == 2.0
    assert combined.sources[1].stats.failures == 1
    reweighted = build(["answer_match", {"source": f"{bad}:flaky", "on_error": "reweight", "weight": 3.0}])
    # answer_match (weight 1) stands in for the failed weight 3: x (1 + 3) / 1
    assert reweighted(["p", "p"], ["4", "5"], answer=[4, 4]).total == [4.0, 0.0]


def test_raise_mode_failure_propagates_with_the_source_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def flaky(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n")
    combined = build([{"source": f"{bad}:flaky", "name": "judge"}])
    with pytest.raises(RewardError, match="'judge' returned an invalid score for sample 0: NaN"):
        combined(["p"], ["x"])


@pytest.mark.parametrize(
    "specs, match",
    [
        (
            [{"source": "answer_match", "wieght": 2}],
            r"reward spec #0: unknown key 'wieght'. Did you mean 'weight'",
        ),
        ([{"source": "answer_match", "isolated": True}], r"unknown key 'isolated'. Did you mean 'isolate'"),
        ([{"weight": 1.0}], "'source' is required"),
        ([{"source": "answer_match", "weight": "high"}], "'weight' must be a number"),
        ([{"source": "answer_match", "weight": True}], "'weight' must be a number"),
        ([{"source": "answer_match", "timeout": -1}], "'timeout' must be > 0"),
        ([{"source": "answer_match", "on_error": "ignore"}], "'on_error' must be one of"),
        ([{"source": "answer_match", "kwargs": [1]}], "'kwargs' must be a mapping"),
        ([{"source": "answer_match", "token_env": "X"}], "'token_env' applies only to http"),
        ([{"source": "answer_match", "memory_mb": 100}], "'memory_mb' needs 'isolate: true'"),
        ([{"source": "answer_match", "isolate": "yes"}], "'isolate' must be true or false"),
        (["answer_match", "answer_match"], r"names must be unique; repeated: \['answer_match'\]"),
        ([], "non-empty list"),
        ([{"source": "answr_match"}], "Did you mean 'answer_match'"),
        ([{"source": "regex_match", "kwargs": {"patern": "x"}}], "unknown keyword argument 'patern'"),
        ([{"source": "http://127.0.0.1:9", "isolate": True}], "a URL is already out of process"),
    ],
)
def test_spec_errors_name_the_key(specs, match):
    with pytest.raises(RewardError, match=match):
        build(specs)


def test_timeout_spec_reaches_the_source():
    combined = build([{"source": "answer_match", "timeout": 3}])
    assert combined.sources[0].timeout == 3.0


def test_sources_plug_into_trl_unchanged():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    combined = build(SPECS)
    sources, weights = combined.sources, combined.weights
    assert [trl_utils.get_callable_name(s) for s in sources] == [
        "answer_match",
        "brevity",
        "starts_with_answer",
    ]
    assert not any(trl_utils.is_async_callable(s) for s in sources)  # trl calls them synchronously
    # the call GRPOTrainer makes: keywords, conversational data, and its extra kwargs
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 2
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5 apples"}]]
    extra = {"answer": [4, 4], "trainer_state": object(), "log_extra": print, "log_metric": print}
    rows = [s(prompts=prompts, completions=completions, completion_ids=[[1], [2]], **extra) for s in sources]
    assert rows == [[1.0, 0.0], [-0.75, -1.0], [1.0, 0.0]]  # "5 apples": -|8-4|/4
    totals = [sum(w * r[i] for w, r in zip(weights, rows)) for i in range(2)]
    assert totals == combined(prompts, completions, **extra).total


def test_combined_reward_requires_sources_with_unique_names():
    with pytest.raises(RewardError):
        CombinedReward([])
    a = RewardSource(lambda p, c: [0.0] * len(p), name="a")
    assert CombinedReward([a]).names == ["a"]


scores = st.one_of(st.none(), st.floats(min_value=-100, max_value=100, allow_nan=False))


@settings(max_examples=40, deadline=None)
@given(
    table=st.lists(st.lists(scores, min_size=4, max_size=4), min_size=1, max_size=3),
    weights=st.lists(st.floats(min_value=-5, max_value=5, allow_nan=False), min_size=3, max_size=3),
)
def test_total_is_the_weighted_sum_over_applied_sources(table, weights):
    sources = [
        RewardSource(lambda p, c, _row=row: list(_row), name=f"s{k}", weight=weights[k])
        for k, row in enumerate(table)
    ]
    result = CombinedReward(sources)(["p"] * 4, ["c"] * 4)
    for i in range(4):
        applied = [(weights[k], row[i]) for k, row in enumerate(table) if row[i] is not None]
        if not applied:
            assert result.total[i] is None
        else:
            assert result.total[i] == pytest.approx(math.fsum(w * x for w, x in applied), abs=1e-9)
