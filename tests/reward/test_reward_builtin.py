"""Built-in rule rewards, against numbers worked by hand."""

import pytest

from alignment.errors import RewardError
from reward import RewardSource, resolve
from reward.builtin.answers import first_integer


def test_first_integer():
    assert first_integer("The sum is 12, not 13.") == 12
    assert first_integer("-7 degrees") == -7
    assert first_integer("no digits") is None


def test_answer_match():
    fn = resolve("answer_match")
    completions = ["12", "The sum is 12.", "13 or 12", "twelve", "x", "5"]
    answers = [12, "12", 12, 12, None, "  "]
    # 12==12 -> 1; first int 12 -> 1; first int 13 != 12 -> 0; no int -> 0; missing answer -> None (x2)
    assert fn(["p"] * 6, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, None, None]
    assert fn(["p"], ["-3"], answer=[-3.0]) == [1.0]
    assert fn(["p"], ["4"], answer=[float("nan")]) == [None]


def test_answer_match_errors_name_column_and_sample():
    fn = resolve("answer_match")
    with pytest.raises(RewardError, match="no 'answer' column"):
        fn(["p"], ["1"], solution=["1"])
    with pytest.raises(RewardError, match=r"sample 1: reference 'n/a'"):
        fn(["p", "p"], ["1", "2"], answer=[1, "n/a"])
    with pytest.raises(RewardError, match="must hold 2 values"):
        fn(["p", "p"], ["1", "2"], answer=[1])


def test_answer_match_other_column():
    fn = resolve("answer_match", column="target")
    assert fn(["p"], ["7"], target=[7]) == [1.0]


def test_answer_match_wrapped_error_names_source():
    src = RewardSource(resolve("answer_match"), name="acc")
    with pytest.raises(RewardError, match=r"'acc' raised RewardError.*sample 1: reference 'n/a'"):
        src(["p", "p"], ["1", "2"], answer=[1, "n/a"])


def test_exact_match():
    fn = resolve("exact_match")
    assert fn(["p"] * 3, [" Paris ", "paris", "Rome"], answer=["Paris", "Paris", None]) == [1.0, 0.0, None]
    fn = resolve("exact_match", case_sensitive=False)
    assert fn(["p"], ["paris"], answer=["Paris"]) == [1.0]


def test_regex_match():
    fn = resolve("regex_match", pattern=r"^\d+$")
    assert fn(["p"] * 3, ["42", "42 apples", ""]) == [1.0, 0.0, 0.0]
    fn = resolve("regex_match", pattern=r"answer: \d+", flags="i")
    assert fn(["p"] * 2, ["ANSWER: 4", "answer 4"]) == [1.0, 0.0]
    fn = resolve("regex_match", pattern=r"\d", fullmatch=True)
    assert fn(["p"] * 2, ["4", "44"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="invalid pattern"):
        resolve("regex_match", pattern="(")
    with pytest.raises(RewardError, match=r"missing keyword argument\(s\) \['pattern'\]"):
        resolve("regex_match")


def test_length_target():
    fn = resolve("length_target", target=10, scale=5)
    # |16-10|/5 = 1.2 ; |10-10| = 0 ; |0-10|/5 = 2
    assert fn(["p"] * 3, ["x" * 16, "x" * 10, ""]) == [-1.2, 0.0, -2.0]
    fn = resolve("length_target", target=4)  # scale defaults to the target
    assert fn(["p"] * 2, ["xx", "xxxxxxxx"]) == [-0.5, -1.0]
    with pytest.raises(RewardError, match="scale must be"):
        resolve("length_target", target=4, scale=0)


def test_repetition_penalty():
    fn = resolve("repetition_penalty", n=2)
    # "a b a b a": bigrams ab ba ab ba -> 4 total, 2 distinct -> -(4-2)/4 = -0.5
    # "a b c d": 3 bigrams, all distinct -> 0 ; "a": no bigram -> 0
    assert fn(["p"] * 3, ["a b a b a", "a b c d", "a"]) == [-0.5, 0.0, 0.0]
    fn = resolve("repetition_penalty", n=1, unit="char")
    # "aaaa": 4 unigrams, 1 distinct -> -0.75
    assert fn(["p"], ["aaaa"]) == [-0.75]
    with pytest.raises(RewardError, match="unit must be"):
        resolve("repetition_penalty", unit="token")


def test_every_builtin_documents_its_formula():
    from reward.registry import REGISTRY

    for name in ("answer_match", "exact_match", "regex_match", "length_target", "repetition_penalty"):
        doc = REGISTRY[name].__doc__ or ""
        assert "r_i" in doc, name
