"""A calculator environment, named in a recipe as

    environment:
      source: examples/envs/calculator.py:Calculator
      max_turns: 4

Its public methods are the tools the policy may call; their type hints and
docstrings become the schemas the chat template shows (transformers'
``get_json_schema``).  The expression tool walks Python's syntax tree and
allows only numbers and + - * / // % ** with parentheses: never ``eval``.
"""

from __future__ import annotations

import ast
import operator

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
SIGNS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64  # 9 ** 9 ** 9 would hang the interpreter: exponents past this are refused
MAX_LENGTH = 200


def evaluate_arithmetic(expression: str):
    """The value of an arithmetic expression, by walking its syntax tree (names, calls and attributes refused)."""
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    tree = ast.parse(expression, mode="eval")

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            return OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in SIGNS:
            return SIGNS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    result = value(tree.body)
    return int(result) if isinstance(result, float) and result.is_integer() else result


class Calculator:
    """Tools for arithmetic; it keeps no state between episodes but counts the calls of the current one."""

    def __init__(self, max_calls: int = 8):
        self.max_calls = max_calls
        self.calls = 0

    def reset(self, **row) -> None:
        """A new episode (the dataset row's columns are given; the prompt already asks the question)."""
        self.calls = 0
        return None

    def _count(self) -> None:
        self.calls += 1
        if self.calls > self.max_calls:
            raise RuntimeError(f"more than {self.max_calls} calls in one episode")

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self._count()
        return int(a) + int(b)

    def evaluate(self, expression: str) -> str:
        """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

        Args:
            expression: The expression, e.g. "(2 + 3) * 4".
        """
        self._count()
        return str(evaluate_arithmetic(expression))
