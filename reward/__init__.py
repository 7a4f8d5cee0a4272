"""Pluggable reward sources behind one contract.

A reward source is any callable
``fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]``
(the call trl's GRPO/RLOO trainers make), where ``None`` means "does not apply
to this sample". See docs/rewards.md.

    import reward
    combined = reward.build([{"source": "answer_match"}, {"source": "length_target", "kwargs": {"target": 8}, "weight": 0.1}])
    result = combined(prompts, completions, answer=answers)   # .total, .per_source, .metrics

Importing this package is light: torch, transformers, httpx and fastapi are
imported only when a source needs them.
"""

import reward.builtin  # noqa: F401 - registers the built-in rules
from alignment.errors import RewardError
from reward.base import RewardSource, RewardStats
from reward.combine import CombinedReward, RewardResult, build
from reward.registry import available, register, resolve

__all__ = [
    "CombinedReward",
    "RewardError",
    "RewardResult",
    "RewardSource",
    "RewardStats",
    "available",
    "build",
    "register",
    "resolve",
]
