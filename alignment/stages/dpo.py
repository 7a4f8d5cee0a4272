"""Stage `dpo`: direct preference optimisation and its loss family, with trl's DPOTrainer.

    align run recipes/tiny/dpo.yaml      # DPO + an SFT term on the chosen answer
    align run recipes/tiny/ipo.yaml      # the same stage with train.loss_type: ipo

The loss is trl's: `train.loss_type` names one loss or a list combined with
`train.loss_weights` (e.g. ["sigmoid", "sft"] = DPO plus the NLL of the chosen
answer); `train.beta`, `train.label_smoothing` (robust, exo_pair),
`train.ld_alpha` and the length-normalised losses (`ipo`, `sigmoid_norm`) are
handed over unchanged.  `options.reference` chooses how the reference model is
kept (see alignment/stages/preference_common.py and docs/preference.md), and
`options.share_prompt` whether each pair's prompt goes through the decoder once
for both answers (alignment/shared_prompt.py: same numbers, fewer tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from alignment import shared_prompt
from alignment.checkpoint import save_run
from alignment.stages import common
from alignment.stages import preference_common as pref


@dataclass(frozen=True)
class Options(pref.Options):
    """`options:` of a dpo recipe: the shared preference options plus `share_prompt`."""

    # auto: one decoder pass over the prompt of each pair when the model allows it (sdpa/eager attention,
    # full attention in every layer); true: the same, or an error naming why not; false: trl's own forward
    share_prompt: Literal["auto", True, False] = "auto"


def trainer_class(share_prompt: bool):
    """trl's DPOTrainer, or a subclass whose loss and reference passes pack each pair's shared prompt."""
    from trl import DPOTrainer

    if not share_prompt:
        return DPOTrainer

    class SharedPromptDPOTrainer(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            with shared_prompt.active():
                return super()._compute_loss(model, inputs, return_outputs)

        def compute_ref_log_probs(self, model, inputs):
            with shared_prompt.active():
                return super().compute_ref_log_probs(model, inputs)

    return SharedPromptDPOTrainer


def run(recipe) -> dict:
    from trl import DPOConfig

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
    reference_kwargs = pref.reference_setup(reference, model, args)
    sharing = shared_prompt.install_for_recipe(recipe, model, reference_kwargs.get("ref_model"))
    shared_prompt.STATS.reset()
    trainer = trainer_class(sharing)(
        model=model,
        args=args,
        train_dataset=pairs.train,
        eval_dataset=pairs.eval if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=common.lora_config(recipe.model.lora),
        **reference_kwargs,
    )
    common.train(trainer, run_dir, resume_from)
    train_seconds, train_cpu_seconds = time.time() - train_started, time.process_time() - cpu_started
    metrics = {
        "stage": "dpo",
        "loss_type": list(args.loss_type),
        "loss_weights": list(args.loss_weights) if args.loss_weights else None,
        "beta": args.beta,
        "reference": reference,
        "share_prompt": sharing,
        # tokens the decoder did not run thanks to the shared prompts (0.33 = a third fewer)
        "share_prompt_saved_fraction": shared_prompt.STATS.saved_fraction(),
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
