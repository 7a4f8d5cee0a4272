"""Stages `orpo`, `cpo` and `simpo`: reference-free preference optimisation with trl.experimental trainers.

    align run recipes/tiny/orpo.yaml

These trainers live in ``trl.experimental`` (ORPOTrainer; CPOTrainer, which
also runs SimPO): their API may change between trl releases without a
deprecation period.  They keep no reference model, so the recipe has no
`options.reference`; the held-out drift and KL are measured against the
starting model, loaded again after training.

* `orpo`: NLL of the chosen answer + beta * odds-ratio term (`train.beta` is ORPO's lambda).
* `cpo`: `train.loss_type` sigmoid | hinge | ipo | simpo | alphapo, plus `cpo_alpha` x NLL of the chosen answer.
* `simpo`: CPOTrainer with `loss_type: simpo` and `cpo_alpha: 0` unless the recipe says otherwise: the
  length-normalised log-probability as the reward, with target margin `simpo_gamma`.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.errors import RecipeError
from alignment.stages import common
from alignment.stages import preference_common as pref

TRAINERS = {
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "cpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
    "simpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
}


def __getattr__(name: str):
    """`ORPOConfig` / `CPOConfig` for the stage registry, imported on first use with trl's experimental warning off
    (the warning is this module's docstring; `align validate` should not print it for every recipe)."""
    for module_name, config_name, _ in TRAINERS.values():
        if name == config_name:
            import importlib
            import os

            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            return getattr(importlib.import_module(module_name), config_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Options:
    """`options:` of an orpo / cpo / simpo recipe (no reference model to choose)."""

    evaluate_before: bool = True  # held-out task metrics of the starting model, for the before/after table
    drop_duplicates: bool = False  # true: identical (prompt, chosen, rejected) rows kept once; repeats are votes
    kl_samples: int = 200  # held-out prompts sampled for KL(policy || start) after training; 0 = off
    heldout_batch_size: int = 128  # batch size of the held-out log-prob passes


def stage_defaults(recipe) -> dict:
    """Config values of the stage; SimPO is CPOTrainer with the SimPO loss and no behaviour-cloning term."""
    defaults = {"remove_unused_columns": False}  # these trainers' collators read the raw columns
    if recipe.stage != "simpo":
        return defaults
    if recipe.train.get("loss_type", "simpo") != "simpo":
        raise RecipeError(f"{recipe.source_path}: train.loss_type: stage simpo uses loss_type simpo; "
                          "use stage cpo for the other CPO losses")
    return {**defaults, "loss_type": "simpo", "cpo_alpha": 0.0}


def trainer_config(recipe, run_dir):
    """trl's ORPOConfig / CPOConfig this recipe trains with (built by `align validate` too)."""
    _, config_name, _ = TRAINERS[recipe.stage]
    config_class = __getattr__(config_name)  # with trl's experimental warning off
    defaults = {**common.trainer_defaults(recipe, run_dir), **stage_defaults(recipe)}
    return common.build_trainer_config(recipe, config_class, defaults)


def run(recipe) -> dict:
    import importlib

    module_name, config_name, trainer_name = TRAINERS[recipe.stage]
    trl_module = importlib.import_module(module_name)
    run = pref.start(recipe, trainer_config, needs_reference=False)
    trainer = getattr(trl_module, trainer_name)(**run.trainer_inputs())
    training = pref.train(run, trainer)
    metrics = {
        "stage": recipe.stage,
        "experimental_trainer": f"{module_name}.{trainer_name}",
        "loss_type": getattr(run.args, "loss_type", "orpo"),
        "beta": run.args.beta,
        **training,
        **run.measure.after(trainer),  # no reference model: drift is in nats against the starting model
        "data": run.pairs.reports,
    }
    return pref.finish(run, trainer, metrics)
