"""The judge source against a loopback OpenAI-compatible server and a tiny local model; the pairwise judge."""

import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from alignment.errors import RewardError  # noqa: E402
from reward import build  # noqa: E402
from reward.judge import (  # noqa: E402
    JudgeReward,
    PairwiseJudge,
    chat_url_path,
    pairwise_outcome,
    pairwise_table,
    parse_choice,
    parse_scale,
)
from tests.reward.test_reward_remote import ServerThread  # noqa: E402

P = ["What is 2 + 2?", "What is 3 + 3?", "What is 4 + 4?"]


class Judge:
    """A fake OpenAI-compatible judge: its reply is worked out from the text it is asked to judge."""

    def __init__(self, rule):
        self.rule, self.requests, self.fail_next = rule, [], 0

    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse

        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            if self.fail_next:
                self.fail_next -= 1
                return JSONResponse({"error": "overloaded"}, status_code=503)
            reply = self.rule(body["messages"][-1]["content"])
            return {"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop"}]}

        return app


def response_of(text):
    return re.search(r"Response: (.*?)\n", text).group(1)


def score_rule(text):
    """8 for a right answer, 3 for a wrong one, no number for '???'; a rubric's 'concise' criterion: 9."""
    answer = response_of(text)
    if answer == "???":
        return "I cannot judge this."
    if "criterion: concise" in text:
        return "9"
    return "Score: 8/10" if answer in ("4", "6", "8") else "3"


@pytest.fixture
def judge_server():
    judge = Judge(score_rule)
    server = ServerThread(judge.app())
    judge.url = server.url
    yield judge
    server.stop()


def test_parsers_against_hand_written_replies():
    assert parse_scale("Score: 7/10", 1, 10) == 7.0
    assert parse_scale("11", 1, 10) is None and parse_scale("no idea", 1, 10) is None
    assert parse_choice("**Yes**, it is right", ["yes", "no"]) == "yes"
    assert parse_choice("tie.", ["A", "B", "tie"]) == "tie" and parse_choice("Both", ["A", "B", "tie"]) is None
    assert chat_url_path("http://h:8000") == ("http://h:8000", "/v1/chat/completions")
    assert chat_url_path("http://h:8000/v1/") == ("http://h:8000/v1", "/chat/completions")


def test_endpoint_judge_scores_caches_and_sends_an_openai_request(judge_server):
    combined = build([{"source": "judge", "kwargs": {"endpoint": judge_server.url, "model_name": "qwen"}}])
    result = combined(P, ["4", "7", "8"])
    assert result.per_source["judge"] == [8.0, 3.0, 8.0]
    request = judge_server.requests[0]
    assert request["model"] == "qwen" and request["temperature"] == 0
    assert request["messages"][0]["role"] == "user" and "on a scale of 1 to 10" in request["messages"][0]["content"]
    again = combined(P, ["4", "7", "8"])
    assert again.per_source["judge"] == [8.0, 3.0, 8.0] and len(judge_server.requests) == 3  # all cached
    assert again.metrics["reward/judge/cache_hits"] == 3.0


def test_unparseable_judgement_is_a_counted_failure_never_a_zero(judge_server):
    combined = build([{"source": "judge", "on_error": "skip", "kwargs": {"endpoint": judge_server.url}},
                      {"source": "answer_match"}])
    result = combined(P, ["4", "???", "8"], answer=[4, 6, 8])
    assert result.per_source["judge"] == [8.0, None, 8.0]
    assert result.total == [9.0, None, 9.0] and result.dropped == [1]  # dropped, not scored 0 by the judge
    assert result.metrics["reward/judge/unparseable"] == 1.0 and combined.sources[0].stats.invalid_scores == 1
    strict = build([{"source": "judge", "kwargs": {"endpoint": judge_server.url, "cache": False}}])
    with pytest.raises(RewardError, match="'judge' returned an invalid score for sample 1: NaN"):
        strict(P, ["4", "???", "8"])


def test_rubric_weights_each_criterion(judge_server):
    judge = JudgeReward(endpoint=judge_server.url, rubric=[{"criterion": "correct", "weight": 3},
                                                           {"criterion": "concise", "weight": 1}])
    # correct: 8 (right) or 3 (wrong); concise: 9 -> (3 * 8 + 9) / 4 = 8.25 and (3 * 3 + 9) / 4 = 4.5
    assert judge(P[:2], ["4", "7"]) == [8.25, 4.5]
    assert len(judge_server.requests) == 4


def test_choices_judge_and_retry_of_a_503(judge_server):
    judge_server.rule = lambda text: "yes" if response_of(text) == "4" else "No."
    judge_server.fail_next = 1
    judge = JudgeReward(endpoint=judge_server.url, choices={"yes": 1.0, "no": 0.0}, retries=2, max_in_flight=1)
    assert judge(P[:2], ["4", "5"]) == [1.0, 0.0]
    assert len(judge_server.requests) == 3  # the 503 was retried


def test_judge_spec_errors_name_the_problem():
    with pytest.raises(RewardError, match="exactly one of 'endpoint'"):
        JudgeReward()
    with pytest.raises(RewardError, match=r"rubric item 0 \('x'\): weight must be > 0"):
        JudgeReward(endpoint="http://127.0.0.1:9", rubric=[{"criterion": "x", "weight": 0}])
    with pytest.raises(RewardError, match=r"template must contain \{completion\}"):
        JudgeReward(endpoint="http://127.0.0.1:9", template="{prompt}")


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    import policies

    path = tmp_path_factory.mktemp("judge")
    model, tokenizer = policies.load("tiny:1m", seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_tiny_local_judge_with_choices_always_parses(tiny_judge_dir):
    judge = JudgeReward(model=tiny_judge_dir, choices={"yes": 1.0, "no": 0.0}, batch_size=2)
    scores = judge(P, ["4", "7", "8"])
    assert len(scores) == 3 and set(scores) <= {0.0, 1.0} and judge.unparseable == 0 and judge.judged == 3


def test_tiny_local_judge_on_a_scale_counts_what_it_cannot_parse(tiny_judge_dir):
    from reward import RewardSource

    judge = JudgeReward(model=tiny_judge_dir, scale=[0, 100], max_new_tokens=4, cache=False)
    source = RewardSource(judge, name="judge", on_error="skip")
    scores = source(P, ["4", "7", "8"])
    failed = [s is None for s in scores]
    assert sum(failed) == judge.unparseable == source.stats.invalid_scores
    assert all(0 <= s <= 100 for s in scores if s is not None)


# ------------------------------------------------------------------ pairwise


def test_pairwise_outcomes_and_table_by_hand():
    assert pairwise_outcome("A", "B") == "a" and pairwise_outcome("B", "A") == "b"
    assert pairwise_outcome("A", "A") == "inconsistent" and pairwise_outcome("tie", "tie") == "tie"
    assert pairwise_outcome(None, "A") == "unparseable"
    table = pairwise_table([("A", "B"), ("A", "B"), ("B", "A"), ("A", "A"), ("tie", "tie"), (None, "B")])
    # valid 5: wins 2, losses 1, tie 1, inconsistent 1 -> (2 + 0.5 * 2) / 5 = 0.6; agreement 4/5
    assert table["win_rate"] == pytest.approx(0.6) and table["agreement"] == pytest.approx(0.8)
    # decided judgements of parseable pairs: A,B,A,B,B,A,A,A -> 5 of 8 picked the first shown
    assert table["first_position_rate"] == pytest.approx(5 / 8)
    assert (table["wins"], table["losses"], table["ties"], table["inconsistent"], table["unparseable"]) == (2, 1, 1, 1, 1)


def test_pairwise_judge_in_both_orders_shows_position_bias():
    shorter = Judge(lambda t: "A" if len(re.search(r"Response A: (.*?)\n", t).group(1)) <
                    len(re.search(r"Response B: (.*?)\n", t).group(1)) else "B")
    always_first = Judge(lambda t: "A")
    for fake, expected in ((shorter, {"win_rate": 1.0, "agreement": 1.0, "first_position_rate": 0.5}),
                           (always_first, {"win_rate": 0.5, "agreement": 0.0, "first_position_rate": 1.0})):
        server = ServerThread(fake.app())
        try:
            verdicts = PairwiseJudge(endpoint=server.url).verdicts(P, ["4", "6", "8"], ["four", "six", "eight"])
        finally:
            server.stop()
        table = pairwise_table(verdicts)
        assert {k: table[k] for k in expected} == expected
        assert len(fake.requests) == 6  # each pair judged in both orders


def test_tiny_local_pairwise_judge_always_gives_a_verdict_in_both_orders(tiny_judge_dir):
    verdicts = PairwiseJudge(model=tiny_judge_dir, batch_size=4).verdicts(P, ["4", "6", "8"], ["5", "7", "9"])
    assert len(verdicts) == 3 and all(v in ("A", "B", "tie") for pair in verdicts for v in pair)
    table = pairwise_table(verdicts)
    assert table["unparseable"] == 0 and table["wins"] + table["losses"] + table["ties"] + table["inconsistent"] == 3
