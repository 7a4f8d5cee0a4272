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
from alignment.checkpoint import save_run
from alignment.stages import common


@dataclass(frozen=True)
class Options:
    """`options:` of a pretrain recipe (none yet)."""


def run(recipe) -> dict:
    from trl import SFTConfig, SFTTrainer

    started = time.time()
    common.offline_defaults()
    common.seed_everything(recipe.seed)
    run_dir, resume_from = common.prepare_run_dir(recipe)
    splits = data.load(recipe.data, "text", seed=recipe.seed)
    model, tokenizer = common.load_policy(recipe)
    defaults = common.trainer_defaults(recipe, run_dir)
    defaults.update({"max_length": 256, "dataset_text_field": "text"})
    args = common.build_trainer_config(recipe, SFTConfig, defaults)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=tokenizer,
        peft_config=common.lora_config(recipe.model.lora),
    )
    common.train(trainer, run_dir, resume_from)
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
    save_run(run_dir, model=trainer.model, tokenizer=tokenizer, recipe=recipe, run_info=common.run_info(recipe),
             metrics=metrics)
    metrics["summary"] = common.summary_line("pretrain", run_dir, metrics, started)
    return metrics
