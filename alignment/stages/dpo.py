"""Stage `dpo`: direct preference optimisation and its loss family, with trl's DPOTrainer.

    align run recipes/tiny/dpo.yaml      # DPO + an SFT term on the chosen answer
    align run recipes/tiny/ipo.yaml      # the same stage with train.loss_type: ipo

The loss is trl's: `train.loss_type` names one loss or a list combined with
`train.loss_weights` (e.g. ["sigmoid", "sft"] = DPO plus the NLL of the chosen
answer); `train.beta`, `train.label_smoothing` (robust, exo_pair),
`train.ld_alpha` and the length-normalised losses (`ipo`, `sigmoid_norm`) are
handed over unchanged.  `options.reference` chooses how the reference model is
kept (see alignment/stages/preference_common.py and docs/preference.md).
"""

from __future__ import annotations

import time

from alignment.checkpoint import save_run
from alignment.stages import common
from alignment.stages import preference_common as pref
from alignment.stages.preference_common import Options  # noqa: F401  (the stage's `options:` dataclass)


def run(recipe) -> dict:
    from trl import DPOConfig, DPOTrainer

    started = time.time()
    common.offline_defaults()
    common.seed_everything(recipe.seed)
    pref.check_reference(recipe)
    run_dir, resume_from = common.prepare_run_dir(recipe)
    tokenizer = common.load_tokenizer(recipe)  # the data is checked before the model loads
    args = common.build_trainer_config(recipe, DPOConfig, common.trainer_defaults(recipe, run_dir))
    pairs = pref.prepare_pairs(recipe, tokenizer, args.max_length)
    model, tokenizer = common.load_policy(recipe)
    reference = pref.choose_reference(recipe, args, len(pairs.train))
    measure = pref.Measurements(recipe, tokenizer, pairs, run_dir)
    measure.before(model)
    train_started, cpu_started = time.time(), time.process_time()  # set-up included: tokenizing, precompute
    trainer = DPOTrainer(
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
    metrics = {
        "stage": "dpo",
        "loss_type": list(args.loss_type),
        "loss_weights": list(args.loss_weights) if args.loss_weights else None,
        "beta": args.beta,
        "reference": reference,
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
    metrics["summary"] = common.summary_line("dpo", run_dir, metrics, started)
    return metrics
