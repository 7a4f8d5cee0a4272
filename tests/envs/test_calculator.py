"""examples/envs/calculator.py: arithmetic by walking the syntax tree, never eval()."""

import importlib.util

import pytest


@pytest.fixture
def calculator(repo_root):
    spec = importlib.util.spec_from_file_location("calculator_example", repo_root / "examples/envs/calculator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("expression, value", [("2 + 3", 5), ("(2 + 3) * 4", 20), ("7 // 2", 3), ("7 / 2", 3.5),
                                               ("-3 ** 2", -9), ("2 ** 10 % 1000", 24), ("6 / 3", 2)])
def test_arithmetic(calculator, expression, value):
    result = calculator.evaluate_arithmetic(expression)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('true')", "not arithmetic"), ("x + 1", "not arithmetic"),
    ("(1).__class__", "not arithmetic"), ("'a' * 3", "not arithmetic"), ("9 ** 9 ** 9", "exponent"),
    ("1 +" * 100, "longer than"), ("1 +", "invalid syntax")])
def test_everything_else_is_refused(calculator, expression, error):
    with pytest.raises((ValueError, SyntaxError), match=error):
        calculator.evaluate_arithmetic(expression)


def test_calls_are_counted_per_episode(calculator):
    env = calculator.Calculator(max_calls=2)
    assert env.add(2, 3) == 5 and env.evaluate("2*3") == "6"
    with pytest.raises(RuntimeError, match="more than 2 calls"):
        env.add(1, 1)
    env.reset(prompt="q")
    assert env.add(1, 1) == 2
