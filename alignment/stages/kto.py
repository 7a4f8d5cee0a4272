"""Stage `kto`: Kahneman-Tversky optimisation with trl's KTOTrainer.

    align run recipes/tiny/kto.yaml

KTO learns from unpaired judgements: rows of prompt + completion + label
(true = desirable).  With `options.unpair: true` a paired file is turned into
such rows (chosen -> true, rejected -> false) after the pair checks
(implicit prompts, duplicates, lengths), and the rows are shuffled with the
recipe seed: KTO's KL term pairs each completion with a neighbour's prompt,
which must not be the same prompt.  Held-out pairs (`data.eval`, paired) are
scored as in DPO.  `options.reference` works as in DPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from alignment.checkpoint import save_run
from alignment.stages import common
from alignment.stages import preference_common as pref


@dataclass(frozen=True)
class Options(pref.Options):
    """`options:` of a kto recipe: the DPO options plus `unpair`."""

    unpair: bool = False  # the data is paired (prompt/chosen/rejected): split each pair into a true and a false row


def run(recipe) -> dict:
    from trl import KTOConfig, KTOTrainer

    started = time.time()
    common.offline_defaults()
    common.seed_everything(recipe.seed)
    pref.check_reference(recipe)
    run_dir, resume_from = common.prepare_run_dir(recipe)
    tokenizer = common.load_tokenizer(recipe)  # the data is checked before the model loads
    args = common.build_trainer_config(recipe, KTOConfig, common.trainer_defaults(recipe, run_dir))
    unpair = recipe.options["unpair"]
    pairs = pref.prepare_pairs(recipe, tokenizer, args.max_length, fmt="preference" if unpair else "unpaired",
                               unpair_rows=unpair, seed=recipe.seed)
    model, tokenizer = common.load_policy(recipe)
    reference = pref.choose_reference(recipe, args, len(pairs.train))
    measure = pref.Measurements(recipe, tokenizer, pairs, run_dir)
    measure.before(model)
    train_started, cpu_started = time.time(), time.process_time()  # set-up included: tokenizing, precompute
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=pairs.train,
        eval_dataset=pairs.eval if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=common.lora_config(recipe.model.lora),
        **pref.reference_setup(reference, model, args),
    )
    common.train(trainer, run_dir, resume_from)
    train_seconds, train_cpu_seconds = time.time() - train_started, time.process_time() - cpu_started
    labels = pairs.train["label"]
    metrics = {
        "stage": "kto",
        "loss_type": args.loss_type,
        "beta": args.beta,
        "reference": reference,
        "desirable_rows": sum(labels),
        "undesirable_rows": len(labels) - sum(labels),
        "train_loss": common.final_train_loss(trainer),
        "train_steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),  # all threads; steadier than wall time on a busy machine
        **measure.after(trainer, beta=args.beta),
        "data": pairs.reports,
    }
    metrics["total_seconds"] = round(time.time() - started, 1)
    save_run(run_dir, model=trainer.model, tokenizer=tokenizer, recipe=recipe, run_info=common.run_info(recipe),
             metrics=metrics)
    metrics["summary"] = common.summary_line("kto", run_dir, metrics, started)
    return metrics
