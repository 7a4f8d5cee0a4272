"""Stage `online_dpo`: DPO on pairs the current policy samples each step, ranked by any reward (ours: alignment.ppo).

    align run recipes/tiny/online_dpo.yaml

Each step samples `train.num_generations` responses of each prompt from the policy being trained, scores
them with the recipe's `reward:` list (rules, Python functions, reward-model directories, URLs), pairs
each prompt's best and worst, and takes the DPO-family loss (`train.loss_type`: sigmoid, ipo, hinge) of
the pairs against the reference - a frozen copy of the starting policy, or the LoRA adapter disabled.
It runs on our RL loop (alignment.ppo.online_dpo.OnlineDPOTrainer: the PPO stage's rollout, reward
plumbing, metrics, checkpoints, clean stops and --resume), not trl's experimental trainer.

Run directory: as the ppo stage's, without a critic: the policy (LoRA merged), metrics.jsonl (one record
per step: the PPO rollout metrics plus `dpo/*`), metrics.json (held-out before/after, train reward, KL,
`preference_judgements`: the pairs trained on) and checkpoints/checkpoint-<step>.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Union

from alignment.errors import RecipeError
from alignment.recipe import check, positive
from alignment.stages import common, ppo


@dataclass(frozen=True)
class Options:
    """`options:` of an online_dpo recipe."""

    evaluate_before: bool = True  # held-out metrics of the starting policy, for the before/after table
    save_steps: int = field(default=50, metadata=check(positive))  # checkpoint every this many steps
    save_total_limit: int = field(default=2, metadata=check(positive))  # checkpoints kept (the newest)
    max_train_seconds: Union[float, None] = field(default=None, metadata=check(positive))  # stop early: controls
    progress_bar: bool = True  # tqdm bar with reward and KL
    log_completions: int = 4  # sampled completions written to completions.jsonl every logging_steps; 0 = none


def build_config(recipe):
    """OnlineDPOConfig from the recipe's `train:` section (the recipe's seed unless `train.seed` is set)."""
    from alignment.ppo.online_dpo import OnlineDPOConfig

    try:
        return OnlineDPOConfig(**{"seed": recipe.seed, **dict(recipe.train)})
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{recipe.source_path}: train: OnlineDPOConfig rejected the settings: {exc}") from None


def build_models(recipe, model):
    """``(policy, ref_policy)``: the LoRA-wrapped model with the adapter-off reference, or the model and a copy."""
    lora = common.lora_config(recipe.model.lora)
    if lora is not None:
        from peft import get_peft_model

        return get_peft_model(model, lora), None
    return model, copy.deepcopy(model)  # frozen by the trainer


def run(recipe) -> dict:
    from alignment.ppo.online_dpo import OnlineDPOTrainer

    config = build_config(recipe)  # validated before anything heavy
    inputs = ppo.load_inputs(recipe, config)
    policy, ref_policy = build_models(recipe, inputs.model)
    reward_fn = ppo.RecipeReward(inputs.rewards)
    trainer = OnlineDPOTrainer(config, policy, ref_policy, inputs.tokenizer, reward_fn, inputs.prompts,
                               accelerator=ppo.accelerator_for(recipe, config))
    log = ppo.train_logged(trainer, reward_fn, recipe, inputs)
    lm = ppo.language_model(trainer)
    metrics = ppo.rl_metrics("online_dpo", trainer, log, inputs,
                             common.evaluate_policy(lm, inputs.tokenizer, recipe.eval))
    metrics["preference_judgements"] = int(sum(entry.get("dpo/pairs", 0) for entry in log))
    inputs.rewards.close()
    return common.finish_run(recipe, inputs.run_dir, lm, inputs.tokenizer, metrics, inputs.started,
                             note=f" | {metrics['preference_judgements']} preference pairs")
