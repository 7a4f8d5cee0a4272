"""The alignment pipeline: recipes, stages, data, PPO, evaluation and the `align` CLI."""

__version__ = "0.1.0"
