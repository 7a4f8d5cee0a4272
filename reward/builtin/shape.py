"""Rewards on the shape of a completion: its length and its repetitiveness."""

from __future__ import annotations

from typing import Any

from reward.errors import RewardError
from reward.registry import register


@register("length_target")
class LengthTarget:
    """Negative distance of the completion's character length from a target.

    r_i = -|len(completion_i) - target| / scale, with ``scale`` defaulting to
    ``max(target, 1)`` (so a completion of length 0 or 2*target scores -1.0).
    Example: target 10, scale 5, a 16-character completion -> -6/5 = -1.2.
    """

    def __init__(self, target: int, scale: float | None = None):
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise RewardError(f"length_target: target must be an integer >= 0, got {target!r}")
        scale = float(max(target, 1)) if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise RewardError(f"length_target: scale must be a number > 0, got {scale!r}")
        self.target = target
        self.scale = float(scale)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        return [-abs(len(c) - self.target) / self.scale for c in completions]


@register("repetition_penalty")
class RepetitionPenalty:
    """Minus the fraction of n-grams that repeat an earlier n-gram of the same completion.

    r_i = -(G_i - U_i) / G_i, where G_i is the number of n-grams of completion i
    and U_i the number of distinct ones; 0.0 when G_i = 0 (shorter than n).
    Units are whitespace-separated words (``unit="word"``) or characters
    (``unit="char"``). Range [-1 + 1/G, 0]. Example, n=2, words
    "a b a b a": bigrams ab ba ab ba -> G=4, U=2 -> -0.5.
    """

    def __init__(self, n: int = 3, unit: str = "word"):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RewardError(f"repetition_penalty: n must be an integer >= 1, got {n!r}")
        if unit not in ("word", "char"):
            raise RewardError(f"repetition_penalty: unit must be 'word' or 'char', got {unit!r}")
        self.n = n
        self.unit = unit

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            units = c.split() if self.unit == "word" else list(c)
            grams = [tuple(units[i : i + self.n]) for i in range(len(units) - self.n + 1)]
            out.append((len(set(grams)) - len(grams)) / len(grams) if grams else 0.0)
        return out
