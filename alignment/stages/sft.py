"""Stage `sft`: supervised fine-tuning with trl's SFTTrainer, loss on completions only.

    align run recipes/tiny/sft.yaml

Data: `messages` (loss on assistant turns), `prompt`+`completion` (loss on the
completion), standard or conversational.  The end-of-turn / EOS token is part
of the completion, so the model learns to stop (pad is a different token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Union

from alignment import data, shared_prompt
from alignment.stages import common


@dataclass(frozen=True)
class Options:
    """`options:` of an sft recipe."""

    evaluate_before: bool = True  # held-out metrics of the starting model, for the before/after table
    max_train_seconds: Union[float, None] = None  # stop after this much training: equal-time controls
    # auto: the tokens every row of a batch starts with (chat template header, system prompt) run once per
    # share_group_size rows when that saves >= 10% of the tokens (alignment/shared_prompt.py: same loss and
    # gradients); true: the same, or an error if the model cannot; false: trl's own forward
    share_prompt: Literal["auto", True, False] = "auto"
    share_group_size: int = 8  # rows packed together: more share the prefix more often, but cost attention


def trainer_class(share_prompt: bool, group_size: int):
    """trl's SFTTrainer, or a subclass whose loss pass runs a batch's common prefix once per group of rows."""
    from trl import SFTTrainer

    if not share_prompt:
        return SFTTrainer

    class SharedPrefixSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            with shared_prompt.active(group_size=group_size):
                return super().compute_loss(model, inputs, *args, **kwargs)

    return SharedPrefixSFTTrainer


def sft_defaults(recipe, run_dir) -> dict:
    defaults = common.trainer_defaults(recipe, run_dir)
    defaults.update({"max_length": 256, "completion_only_loss": None, "padding_free": False})
    return defaults


def trainer_config(recipe, run_dir):
    """trl's SFTConfig this recipe trains with (built by `align validate` too: its errors come before a run)."""
    from trl import SFTConfig

    return common.build_trainer_config(recipe, SFTConfig, sft_defaults(recipe, run_dir))


def run(recipe) -> dict:
    started, run_dir, resume_from = common.start_run(recipe)
    splits = data.load(recipe.data, "sft", seed=recipe.seed)
    model, tokenizer = common.load_policy(recipe)
    before = common.evaluate_policy(model, tokenizer, recipe.eval) if recipe.options["evaluate_before"] else None
    args = trainer_config(recipe, run_dir)
    sharing = shared_prompt.install_for_recipe(recipe, model)
    trainer = trainer_class(sharing, recipe.options["share_group_size"])(
        **common.trainer_inputs(recipe, model, tokenizer, args, splits.train, splits.eval))
    common.train(trainer, recipe, run_dir, resume_from, max_seconds=recipe.options["max_train_seconds"])
    after = common.evaluate_policy(trainer.model, tokenizer, recipe.eval)
    metrics = {
        "stage": "sft",
        "train_loss": common.final_train_loss(trainer),
        "train_steps": trainer.state.global_step,
        "train_seconds": round(time.time() - started, 1),
        **shared_prompt.outcome(sharing, model),  # and the share of decoder tokens not run
        "before": before,
        "after": after,
        "data": [vars(report) for report in splits.reports],
    }
    return common.finish_run(recipe, run_dir, trainer.model, tokenizer, metrics, started)
