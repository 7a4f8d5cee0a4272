"""The local `evaluate` metric modules load offline and compute hand-checked numbers."""

import math

import pytest

from alignment.errors import AlignmentError
from alignment.evaluation import available_metrics, load_metric

EXPECTED = {"bleu", "distinct_n", "perplexity", "rouge", "verifiable_accuracy", "win_rate"}


def test_every_metric_is_shipped_and_unknown_names_list_them():
    assert EXPECTED <= set(available_metrics())
    with pytest.raises(AlignmentError, match="verifiable_accuracy"):
        load_metric("blue")


def test_verifiable_accuracy():
    metric = load_metric("verifiable_accuracy")
    out = metric.compute(predictions=["42", "It is 7.", "none", "-3 is it"], references=[42, 8, 1, -3])
    assert out == {"accuracy": 0.5, "parsed_rate": 0.75, "n": 4}


def test_distinct_n_metric():
    out = load_metric("distinct_n").compute(predictions=["the cat sat", "the cat ran"], n=[1, 2])
    assert out == {"distinct_1": pytest.approx(4 / 6), "distinct_2": pytest.approx(3 / 4)}
    assert load_metric("distinct_n").compute(predictions=["a a"], n=1) == {"distinct_1": 0.5}


def test_win_rate_metric():
    out = load_metric("win_rate").compute(
        scores_a=[1.0, 0.0, 2.0, None], scores_b=[0.0, 0.0, 3.0, 1.0], n_resamples=200
    )
    # win, tie, loss on the first three prompts; the fourth has no score for A
    assert (out["win"], out["tie"], out["loss"], out["skipped"]) == (1, 1, 1, 1)
    assert out["win_rate"] == pytest.approx(0.5)
    assert out["ci_low"] <= 0.5 <= out["ci_high"]


def test_perplexity_metric():
    out = load_metric("perplexity").compute(nlls=[[math.log(2), math.log(2)], [math.log(4)]])
    # corpus: exp((2 ln 2 + ln 4) / 3) = 2^(4/3); per text: 2 and 4
    assert out["perplexity"] == pytest.approx(2 ** (4 / 3))
    assert out["perplexities"] == pytest.approx([2.0, 4.0])
    assert out["mean_perplexity"] == pytest.approx(3.0)
    assert out["total_tokens"] == 3


def test_bleu_metric_by_hand():
    metric = load_metric("bleu")
    out = metric.compute(predictions=["the cat sat on the mat"], references=["the cat sat on a mat"])
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so brevity penalty 1
    assert out["precisions"] == pytest.approx([5 / 6, 3 / 5, 2 / 4, 1 / 3])
    assert out["brevity_penalty"] == pytest.approx(1.0)
    assert out["bleu"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    multi = metric.compute(
        predictions=["the cat sat on the mat"], references=[["the cat sat on the mat", "x y"]]
    )
    assert multi["bleu"] == pytest.approx(1.0)


def test_rouge_metric_by_hand():
    out = load_metric("rouge").compute(predictions=["the cat sat"], references=["the cat ran"])
    # unigrams 2 of 3 both ways; bigrams (the cat) 1 of 2; LCS "the cat" = 2 of 3
    assert out["rouge1"] == pytest.approx(2 / 3)
    assert out["rouge2"] == pytest.approx(1 / 2)
    assert out["rougeL"] == pytest.approx(2 / 3)
