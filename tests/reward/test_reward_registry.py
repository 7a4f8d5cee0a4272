"""Source strings: registered names, module:function, file.py:function, classes, kwargs, errors."""

import os
import subprocess
import sys

import pytest

from alignment.errors import RewardError
from reward import RewardSource, register, resolve
from reward.builtin import AnswerMatch
from reward.registry import REGISTRY, available, default_name

FIXTURE = "tests/reward/fixtures/my_reward.py"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # file sources are relative to the cwd


def test_builtins_are_registered():
    assert {"answer_match", "regex_match", "length_target", "repetition_penalty", "exact_match"} <= set(
        available()
    )
    assert isinstance(resolve("answer_match"), AnswerMatch)


def test_register_decorator_and_resolve_by_name():
    @register("test_registry_shout")
    def shout(prompts, completions, **columns):
        return [float(c.isupper()) for c in completions]

    assert resolve("test_registry_shout") is shout
    assert REGISTRY["test_registry_shout"] is shout
    with pytest.raises(RewardError, match="already registered"):
        register("test_registry_shout")(lambda p, c: [])


def test_unknown_name_lists_valid_names_and_did_you_mean():
    with pytest.raises(RewardError) as info:
        resolve("answer_mach")
    msg = str(info.value)
    assert "Did you mean 'answer_match'" in msg
    assert "length_target" in msg and "regex_match" in msg  # the valid names are listed


def test_external_file_function_used_with_an_extra_column():
    fn = resolve(f"{FIXTURE}:starts_with_answer")
    src = RewardSource(fn, name="mine")
    out = src(["q1", "q2", "q3"], ["12 apples", "13", "7"], answer=[12, 12, None], trainer_state=None)
    assert out == [1.0, 0.0, None]


def test_file_class_is_instantiated_with_kwargs():
    fn = resolve(f"{FIXTURE}:Keyword", word="cat", bonus=0.5)
    assert fn(["p", "p"], ["a cat", "a dog"]) == [0.5, 0.0]
    with pytest.raises(RewardError, match=r"unknown keyword argument 'wrd'. Did you mean 'word'"):
        resolve(f"{FIXTURE}:Keyword", wrd="cat")
    with pytest.raises(RewardError, match=r"missing keyword argument\(s\) \['word'\]"):
        resolve(f"{FIXTURE}:Keyword")


def test_file_async_function():
    src = RewardSource(resolve(f"{FIXTURE}:async_length"), name="len")
    assert src(["p"], ["abcd"]) == [4.0]


def test_file_errors():
    with pytest.raises(RewardError, match="file not found"):
        resolve("tests/reward/fixtures/nope.py:f")
    with pytest.raises(
        RewardError, match=r"'start_with_answer' not found.*Did you mean 'starts_with_answer'"
    ):
        resolve(f"{FIXTURE}:start_with_answer")
    with pytest.raises(RewardError, match="name the function too"):
        resolve(FIXTURE)


def test_file_that_fails_to_run(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('broken at import')\n")
    with pytest.raises(RewardError, match="running .*bad.py failed: RuntimeError: broken at import"):
        resolve(f"{bad}:f")


def test_module_function_and_module_errors():
    fn = resolve("reward.builtin.shape:LengthTarget", target=3)
    assert fn(["p"], ["abcdef"]) == [-1.0]
    with pytest.raises(RewardError, match="cannot import module 'no_such_pkg.mod'"):
        resolve("no_such_pkg.mod:f")
    with pytest.raises(RewardError, match="'Nope' not found"):
        resolve("reward.builtin.shape:Nope")


def test_function_kwargs_are_bound_and_checked(tmp_path):
    mod = tmp_path / "fk.py"
    mod.write_text(
        "def scaled(prompts, completions, factor=1.0):\n    return [factor * len(c) for c in completions]\n"
    )
    fn = resolve(f"{mod}:scaled", factor=2.0)
    assert fn.__name__ == "scaled"
    assert RewardSource(fn, name="s")(["p"], ["abc"], answer=[1]) == [6.0]
    with pytest.raises(RewardError, match="unknown keyword argument 'factr'. Did you mean 'factor'"):
        resolve(f"{mod}:scaled", factr=2.0)


def test_not_callable_attribute(tmp_path):
    mod = tmp_path / "nc.py"
    mod.write_text("VALUE = 3\n")
    with pytest.raises(RewardError, match="is a int, not a callable"):
        resolve(f"{mod}:VALUE")


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(RewardError, match="no config.json"):
        resolve(str(tmp_path))


def test_default_names():
    assert default_name("answer_match") == "answer_match"
    assert default_name("pkg.mod:score") == "score"
    assert default_name("tests/x.py:Cls.method") == "method"
    assert default_name("http://127.0.0.1:8000") == "remote_127.0.0.1_8000"
    assert default_name("runs/rm/") == "rm"


def test_import_reward_stays_light():
    code = (
        "import sys, reward; reward.build(['answer_match']);"
        "heavy = [m for m in ('torch', 'transformers', 'httpx', 'fastapi', 'uvicorn') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
