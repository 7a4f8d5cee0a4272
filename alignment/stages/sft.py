"""Stage `sft`: supervised fine-tuning with trl's SFTTrainer, loss on completions only.

    align run recipes/tiny/sft.yaml

Data: `messages` (loss on assistant turns), `prompt`+`completion` (loss on the
completion), standard or conversational.  The end-of-turn / EOS token is part
of the completion, so the model learns to stop (pad is a different token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Union

from alignment import data
from alignment.checkpoint import save_run
from alignment.stages import common


@dataclass(frozen=True)
class Options:
    """`options:` of an sft recipe."""

    evaluate_before: bool = True  # held-out metrics of the starting model, for the before/after table
    max_train_seconds: Union[float, None] = None  # stop after this much training: equal-time controls


def sft_defaults(recipe, run_dir) -> dict:
    defaults = common.trainer_defaults(recipe, run_dir)
    defaults.update({"max_length": 256, "completion_only_loss": None, "padding_free": False})
    return defaults


def run(recipe) -> dict:
    from trl import SFTConfig, SFTTrainer

    started = time.time()
    common.offline_defaults()
    common.seed_everything(recipe.seed)
    run_dir, resume_from = common.prepare_run_dir(recipe)
    splits = data.load(recipe.data, "sft", seed=recipe.seed)
    model, tokenizer = common.load_policy(recipe)
    before = common.evaluate_policy(model, tokenizer, recipe.eval) if recipe.options["evaluate_before"] else None
    args = common.build_trainer_config(recipe, SFTConfig, sft_defaults(recipe, run_dir))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=tokenizer,
        peft_config=common.lora_config(recipe.model.lora),
    )
    common.train(trainer, run_dir, resume_from, max_seconds=recipe.options["max_train_seconds"])
    after = common.evaluate_policy(trainer.model, tokenizer, recipe.eval)
    metrics = {
        "stage": "sft",
        "train_loss": common.final_train_loss(trainer),
        "train_steps": trainer.state.global_step,
        "train_seconds": round(time.time() - started, 1),
        "before": before,
        "after": after,
        "data": [vars(report) for report in splits.reports],
    }
    save_run(run_dir, model=trainer.model, tokenizer=tokenizer, recipe=recipe, run_info=common.run_info(recipe),
             metrics=metrics)
    metrics["summary"] = common.summary_line("sft", run_dir, metrics, started)
    return metrics
