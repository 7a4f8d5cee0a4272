"""Reading a dataset column out of a reward call's keyword arguments."""

from __future__ import annotations

import math
from typing import Any

from reward.base import NOT_COLUMNS
from reward.errors import RewardError


def column(columns: dict[str, Any], name: str, n: int, source: str) -> list[Any]:
    """The column ``name`` as a list of n values; RewardError if absent or the wrong length."""
    if name not in columns:
        given = sorted(
            k for k in columns if k not in NOT_COLUMNS
        )
        raise RewardError(f"{source}: the batch has no '{name}' column (columns given: {given or 'none'})")
    values = columns[name]
    if not isinstance(values, list | tuple) or len(values) != n:
        got = len(values) if isinstance(values, list | tuple) else type(values).__name__
        raise RewardError(f"{source}: column '{name}' must hold {n} values (one per sample), got {got}")
    return list(values)


def is_missing(value: Any) -> bool:
    """None, NaN or a blank string: the row has no value."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()
