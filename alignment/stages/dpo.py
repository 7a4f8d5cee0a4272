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

from dataclasses import dataclass
from typing import Literal

from alignment import shared_prompt
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


def trainer_config(recipe, run_dir):
    """trl's DPOConfig this recipe trains with (built by `align validate` too)."""
    from trl import DPOConfig

    return common.build_trainer_config(recipe, DPOConfig, common.trainer_defaults(recipe, run_dir))


def run(recipe) -> dict:
    run = pref.start(recipe, trainer_config)
    args = run.args
    reference = pref.choose_reference(recipe, args, len(run.pairs.train))
    reference_kwargs = pref.reference_setup(reference, run.model, args)
    sharing = shared_prompt.install_for_recipe(recipe, run.model, reference_kwargs.get("ref_model"))
    trainer = trainer_class(sharing)(**run.trainer_inputs(), **reference_kwargs)
    training = pref.train(run, trainer)
    metrics = {
        "stage": "dpo",
        "loss_type": list(args.loss_type),
        "loss_weights": list(args.loss_weights) if args.loss_weights else None,
        "beta": args.beta,
        "reference": reference,
        # tokens the decoder did not run thanks to the shared prompts (0.33 = a third fewer)
        **shared_prompt.outcome(sharing, run.model, reference_kwargs.get("ref_model")),
        **training,
        **run.measure.after(trainer, beta=args.beta),
        "data": run.pairs.reports,
    }
    return pref.finish(run, trainer, metrics)
