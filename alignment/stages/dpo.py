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
    reference = pref.resolve_reference(recipe)
    run_dir, resume_from = common.prepare_run_dir(recipe)
    model, tokenizer = common.load_policy(recipe)
    ref_kwargs, ref_config = pref.reference_kwargs(reference, model)
    args = common.build_trainer_config(recipe, DPOConfig, {**common.trainer_defaults(recipe, run_dir), **ref_config})
    pairs = pref.prepare_pairs(recipe, tokenizer, args.max_length)
    heldout = pref.HeldOut(tokenizer, pairs.eval_rows, recipe.options["heldout_batch_size"])
    before = common.evaluate_policy(model, tokenizer, recipe.eval) if recipe.options["evaluate_before"] else None
    heldout_before = heldout.score_start(model)
    pref.log_record(run_dir, 0, heldout_before, "heldout")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs.train,
        eval_dataset=pairs.eval,
        processing_class=tokenizer,
        peft_config=common.lora_config(recipe.model.lora),
        callbacks=[common.metrics_logger(run_dir)],
        **ref_kwargs,
    )
    train_started = time.time()
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - train_started
    policy = trainer.accelerator.unwrap_model(trainer.model)
    heldout_after = heldout.score(policy, beta=args.beta)
    pref.log_record(run_dir, trainer.state.global_step, heldout_after, "heldout")
    kl = None
    if heldout and recipe.options["kl_samples"]:
        with pref.reference_model(trainer, recipe) as start_model:
            kl = pref.sampled_kl(policy, start_model, tokenizer, heldout.prompts(recipe.options["kl_samples"]),
                                 max_new_tokens=recipe.eval.max_new_tokens if recipe.eval else 16, seed=recipe.seed)
    after = common.evaluate_policy(policy, tokenizer, recipe.eval)
    metrics = {
        "stage": "dpo",
        "loss_type": list(args.loss_type),
        "reference": reference,
        "train_loss": common.final_train_loss(trainer),
        "train_steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "train_margin_first_last": pref.logged_series(trainer, "rewards/margins"),
        "train_accuracy_first_last": pref.logged_series(trainer, "rewards/accuracies"),
        "heldout_before": heldout_before,
        "heldout_after": heldout_after,
        "kl_to_reference": kl,
        "before": before,
        "after": after,
        "data": pairs.reports,
    }
    save_run(run_dir, model=trainer.model, tokenizer=tokenizer, recipe=recipe, run_info=common.run_info(recipe),
             metrics=metrics)
    metrics["total_seconds"] = round(time.time() - started, 1)
    metrics["summary"] = common.summary_line("dpo", run_dir, metrics, started)
    return metrics
