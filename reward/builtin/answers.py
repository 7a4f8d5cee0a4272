"""Rewards that compare a completion with a reference column."""

from __future__ import annotations

import re
from typing import Any

from reward.builtin._columns import column, is_missing
from reward.errors import RewardError
from reward.registry import register

_INT = re.compile(r"[-+]?\d+")


def first_integer(text: str) -> int | None:
    """The first integer written in ``text`` (an optional sign, then digits), or None."""
    m = _INT.search(text)
    return int(m.group()) if m else None


@register("answer_match")
class AnswerMatch:
    """1.0 if the first integer in the completion equals the reference, else 0.0.

    r_i = 1[first_integer(completion_i) == int(answer_i)]

    The reference is read from the column ``column`` (default ``answer``): an
    int, or a string whose first integer is taken. A row whose reference is
    missing (None, NaN, "") scores None (does not apply). A completion with no
    integer scores 0.0. Example: completion "The sum is 12." with answer 12 -> 1.0.
    """

    def __init__(self, column: str = "answer"):
        self.column = column

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        refs = column(columns, self.column, len(completions), "answer_match")
        out: list[float | None] = []
        for i, (completion, ref) in enumerate(zip(completions, refs)):
            if is_missing(ref):
                out.append(None)
                continue
            expected = _as_int(ref)
            if expected is None:
                raise RewardError(
                    f"answer_match: sample {i}: reference {ref!r} in column '{self.column}' has no integer"
                )
            out.append(1.0 if first_integer(completion) == expected else 0.0)
        return out


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return first_integer(str(value))


@register("exact_match")
class ExactMatch:
    """1.0 if the completion equals the reference string, else 0.0.

    r_i = 1[norm(completion_i) == norm(str(ref_i))], where norm strips
    surrounding whitespace (``strip=True``) and lower-cases
    (``case_sensitive=False``). The reference comes from column ``column``
    (default ``answer``); a missing reference scores None.
    """

    def __init__(self, column: str = "answer", strip: bool = True, case_sensitive: bool = True):
        self.column = column
        self.strip = strip
        self.case_sensitive = case_sensitive

    def _norm(self, text: str) -> str:
        text = text.strip() if self.strip else text
        return text if self.case_sensitive else text.lower()

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        refs = column(columns, self.column, len(completions), "exact_match")
        return [
            None if is_missing(ref) else float(self._norm(c) == self._norm(str(ref)))
            for c, ref in zip(completions, refs)
        ]


_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@register("regex_match")
class RegexMatch:
    """1.0 if the completion matches ``pattern``, else 0.0.

    r_i = 1[re.search(pattern, completion_i)] (``fullmatch=True``: the whole
    completion must match). ``flags`` is a string of re flags: "i", "m", "s", "x".
    Example: pattern r"^\\d+$" scores "42" 1.0 and "42 apples" 0.0.
    """

    def __init__(self, pattern: str, fullmatch: bool = False, flags: str = ""):
        bad = set(flags) - set(_FLAGS)
        if bad:
            raise RewardError(f"regex_match: unknown flag(s) {sorted(bad)}; use any of {sorted(_FLAGS)}")
        value = 0
        for f in flags:
            value |= _FLAGS[f]
        try:
            self.regex = re.compile(pattern, value)
        except re.error as exc:
            raise RewardError(f"regex_match: invalid pattern {pattern!r}: {exc}") from exc
        self.fullmatch = fullmatch

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        match = self.regex.fullmatch if self.fullmatch else self.regex.search
        return [1.0 if match(c) else 0.0 for c in completions]
