"""Stage `pretrain`: causal-LM training on plain text (trl's SFTTrainer on a `text` column).

    align run recipes/tiny/pretrain.yaml

Every token carries a label.  Packing is off by default: packed rows are only
correct when sequences cannot attend to each other (padding-free batches with
position ids, as trl builds them, or FlashAttention); see docs/performance.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from alignment import data
from alignment.stages import common


@dataclass(frozen=True)
class Options:
    """`options:` of a pretrain recipe (none yet)."""


def trainer_config(recipe, run_dir):
    """trl's SFTConfig over plain text (built by `align validate` too)."""
    from trl import SFTConfig

    defaults = {**common.trainer_defaults(recipe, run_dir), "max_length": 256, "dataset_text_field": "text"}
    return common.build_trainer_config(recipe, SFTConfig, defaults)


def run(recipe) -> dict:
    from trl import SFTTrainer

    started, run_dir, resume_from = common.start_run(recipe)
    splits = data.load(recipe.data, "text", seed=recipe.seed)
    model, tokenizer = common.load_policy(recipe)
    args = trainer_config(recipe, run_dir)
    trainer = SFTTrainer(**common.trainer_inputs(recipe, model, tokenizer, args, splits.train, splits.eval))
    common.train(trainer, recipe, run_dir, resume_from)
    held_out = trainer.evaluate() if splits.eval is not None else {}
    metrics = {
        "stage": "pretrain",
        "train_loss": common.final_train_loss(trainer),
        "train_steps": trainer.state.global_step,
        "train_seconds": round(time.time() - started, 1),
        "eval_loss": held_out.get("eval_loss"),
        "eval_perplexity": math.exp(held_out["eval_loss"]) if "eval_loss" in held_out else None,
        "data": [vars(report) for report in splits.reports],
    }
    return common.finish_run(recipe, run_dir, trainer.model, tokenizer, metrics, started)
