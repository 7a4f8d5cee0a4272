"""Pluggable reward sources behind one contract.

A reward source is any callable, called by keyword as trl's GRPO/RLOO trainers
call reward functions (``fn(prompts=..., completions=..., completion_ids=...,
**columns) -> list[float | None]``; a function takes what it names), where
``None`` means "does not apply to this sample". verl's ``compute_score`` and
OpenRLHF's ``reward_func`` are adapted (`reward.conventions`). See docs/rewards.md.

    import reward
    combined = reward.build([{"source": "answer_match"}, {"source": "length_target", "kwargs": {"target": 8}, "weight": 0.1}])
    result = combined(prompts, completions, answer=answers)   # .total, .per_source, .metrics

Importing this package is light: torch, transformers, httpx and fastapi are
imported only when a source needs them.
"""

import reward.builtin  # noqa: F401 - registers the built-in rules
from reward.base import RewardSource, RewardStats
from reward.combine import CombinedReward, RewardResult, build
from reward.errors import RewardError
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
