"""Environments for multi-turn RL: the contract, the one tool-call parser, the episode runner (no trainer inside).

See docs/environments.md.  trl's GRPOTrainer drives the same environments through its own `environment_factory`
(alignment.envs.trl_bridge); our PPO loop uses :func:`run_episode`.
"""

from alignment.envs.base import (
    EnvError,
    EnvironmentSpec,
    RetokenizationError,
    StepResult,
    ToolBox,
    call_with_timeout,
    load_factory,
    tool_schemas,
    tools_of,
)
from alignment.envs.episode import (
    Episode,
    Play,
    Turn,
    check_retokenization,
    run_episode,
    run_episodes,
    sampler,
)
from alignment.envs.tool_calls import ParsedTurn, ToolCall, parse_assistant

__all__ = ["EnvError", "EnvironmentSpec", "Episode", "ParsedTurn", "Play", "RetokenizationError", "StepResult",
           "ToolBox", "ToolCall", "Turn", "call_with_timeout", "check_retokenization", "load_factory",
           "parse_assistant", "run_episode", "run_episodes", "sampler", "tool_schemas", "tools_of"]
