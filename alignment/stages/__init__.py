"""Stage registry: each stage is a module with ``run(recipe) -> dict`` and an ``Options`` dataclass.

Stage modules import nothing heavy at import time, so `align validate` can
check every recipe (including the `train:` keys against the trainer's config
class) without building a model or a trainer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from alignment.errors import RecipeError

# trl declares no `choices` for these two loss_type fields: the valid names are an if-chain in the trainer
# (DPOTrainer's loss, GRPOTrainer's loss and normalisation).  So the list is kept here, beside the stage, and
# tests/foundation/test_validate.py checks it equals the names that chain handles in the installed trl.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # the module with run() and Options
    config: str  # "module:Class" of the config the `train:` section is handed to
    data_format: str  # the dataset format alignment.data validates against
    needs_reward: bool = False
    summary: str = ""
    # `train:` key -> its valid values, where the config class does not declare them (trl's `choices` metadata)
    train_choices: dict = field(default_factory=dict)

    def load_module(self):
        return importlib.import_module(self.module)

    def config_class(self):
        module_name, _, class_name = self.config.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def options_class(self):
        return self.load_module().Options


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("pretrain", "alignment.stages.pretrain", "trl:SFTConfig", "text",
                  summary="causal-LM training on plain text"),
        StageSpec("sft", "alignment.stages.sft", "trl:SFTConfig", "sft",
                  summary="supervised fine-tuning, loss on completions only"),
        StageSpec("reward_model", "alignment.stages.reward_model", "trl:RewardConfig", "preference",
                  summary="scalar reward model on preference pairs (trl's RewardTrainer), held-out pair accuracy"),
        StageSpec("grpo", "alignment.stages.online_rl", "trl:GRPOConfig", "prompt", needs_reward=True,
                  summary="group relative policy optimisation (trl's GRPOTrainer)",
                  train_choices={"loss_type": GRPO_LOSS_TYPES}),
        StageSpec("rloo", "alignment.stages.online_rl", "trl:RLOOConfig", "prompt", needs_reward=True,
                  summary="REINFORCE leave-one-out (trl's RLOOTrainer)"),
        StageSpec("dpo", "alignment.stages.dpo", "trl:DPOConfig", "preference",
                  summary="direct preference optimisation and its loss family: IPO, robust, ... (trl's DPOTrainer)",
                  train_choices={"loss_type": DPO_LOSS_TYPES}),
        StageSpec("kto", "alignment.stages.kto", "trl:KTOConfig", "unpaired",
                  summary="Kahneman-Tversky optimisation on unpaired (or unpaired-from-pairs) data (trl's KTOTrainer)"),
        StageSpec("orpo", "alignment.stages.preference_relatives",
                  "alignment.stages.preference_relatives:ORPOConfig", "preference",
                  summary="odds-ratio preference optimisation, no reference model (trl.experimental)"),
        StageSpec("cpo", "alignment.stages.preference_relatives",
                  "alignment.stages.preference_relatives:CPOConfig", "preference",
                  summary="contrastive preference optimisation, no reference model (trl.experimental)"),
        StageSpec("simpo", "alignment.stages.preference_relatives",
                  "alignment.stages.preference_relatives:CPOConfig", "preference",
                  summary="SimPO: length-normalised reward with a margin, no reference model (trl.experimental CPO)"),
        StageSpec("ppo", "alignment.stages.ppo", "alignment.ppo.config:PPOConfig", "prompt", needs_reward=True,
                  summary="PPO with a learned critic (value head or separate), KL to a reference (ours: alignment.ppo)"),
        StageSpec("online_dpo", "alignment.stages.online_dpo", "alignment.ppo.online_dpo:OnlineDPOConfig", "prompt",
                  needs_reward=True,
                  summary="online DPO: k samples per prompt from the current policy, best vs worst by the reward, DPO "
                          "loss against the reference (ours: alignment.ppo)"),
        StageSpec("best_of_n", "alignment.stages.best_of_n", "trl:SFTConfig", "prompt", needs_reward=True,
                  summary="rejection sampling: N samples per prompt, keep the best (and worst as pairs), optional SFT"),
    ]
}


def register_stage(spec: StageSpec) -> None:
    STAGES[spec.name] = spec


def stage_spec(name: str, locations=None) -> StageSpec:
    """The registered stage called `name`; an unknown name lists the valid ones."""
    if name not in STAGES:
        import difflib

        close = difflib.get_close_matches(name, list(STAGES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"unknown stage {name!r}{hint} (valid stages: {', '.join(sorted(STAGES))})"
        if locations is not None:
            raise locations.error(("stage",), message)
        raise RecipeError(message)
    return STAGES[name]
