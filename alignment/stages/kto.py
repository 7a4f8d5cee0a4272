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

from dataclasses import dataclass

from alignment.stages import common
from alignment.stages import preference_common as pref


@dataclass(frozen=True)
class Options(pref.Options):
    """`options:` of a kto recipe: the DPO options plus `unpair`."""

    unpair: bool = False  # the data is paired (prompt/chosen/rejected): split each pair into a true and a false row


def trainer_config(recipe, run_dir):
    """trl's KTOConfig this recipe trains with (built by `align validate` too)."""
    from trl import KTOConfig

    return common.build_trainer_config(recipe, KTOConfig, common.trainer_defaults(recipe, run_dir))


def run(recipe) -> dict:
    from trl import KTOTrainer

    unpair = recipe.options["unpair"]
    run = pref.start(recipe, trainer_config, fmt="preference" if unpair else "unpaired", unpair_rows=unpair,
                     seed=recipe.seed)
    args = run.args
    reference = pref.choose_reference(recipe, args, len(run.pairs.train))
    trainer = KTOTrainer(**run.trainer_inputs(), **pref.reference_setup(reference, run.model, args))
    training = pref.train(run, trainer)
    labels = run.pairs.train["label"]
    metrics = {
        "stage": "kto",
        "loss_type": args.loss_type,
        "beta": args.beta,
        "reference": reference,
        "desirable_rows": sum(labels),
        "undesirable_rows": len(labels) - sum(labels),
        **training,
        **run.measure.after(trainer, beta=args.beta),
        "data": run.pairs.reports,
    }
    return pref.finish(run, trainer, metrics)
