"""Stages `grpo` and `rloo`: trl's GRPOTrainer / RLOOTrainer on the shared reward sources.

    align run recipes/tiny/grpo.yaml
    align run recipes/tiny/rloo.yaml

The recipe's `reward:` list is built by `reward.build` and handed to trl as
`reward_funcs` (each source keeps its name, so trl logs `rewards/<name>/mean`)
with the recipe weights as `reward_weights`: the same sources PPO and
evaluation use, unchanged.  Dataset columns besides `prompt` (e.g. `answer`)
reach the reward functions as keyword arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Union

from alignment import data, shared_prompt
from alignment.guards import DEFAULT_MAX_KL_PER_TOKEN, DEFAULT_MIN_ENTROPY, DEFAULT_MIN_EOS_RATE
from alignment.stages import common

TRAINERS = {"grpo": ("GRPOConfig", "GRPOTrainer"), "rloo": ("RLOOConfig", "RLOOTrainer")}


@dataclass(frozen=True)
class Options:
    """`options:` of a grpo/rloo recipe."""

    evaluate_before: bool = True  # held-out metrics of the starting policy, for the before/after table
    # health of trl's logged metrics at each log (None = off), as PPO's train.max_kl etc.; the defaults fire
    # only on a collapsed run (alignment.guards)
    max_kl: Union[float, None] = DEFAULT_MAX_KL_PER_TOKEN  # kl (mean per token, to the reference) above this
    min_entropy: Union[float, None] = DEFAULT_MIN_ENTROPY  # entropy (per token) below this: collapsing
    min_eos_rate: Union[float, None] = DEFAULT_MIN_EOS_RATE  # completions that end (1 - completions/clipped_ratio)
    warn_or_stop: Literal["warn", "stop"] = "warn"  # stop = save a checkpoint, stop, fail the run
    # auto: the log-prob passes run each prompt once for its group of completions when the model allows it
    # (alignment/shared_prompt.py: same numbers, fewer tokens); true: the same or an error; false: trl's own
    share_prompt: Literal["auto", True, False] = "auto"


def drop_or_reweight_failures(rewards_per_func, combined, n_local: int, process_index: int):
    """trl's (samples x sources) reward matrix with our failure semantics applied.

    trl reads a None score as NaN and sums with nansum, so a source that *failed* on a sample would count
    as 0 there.  Each row is multiplied by :meth:`CombinedReward.sample_scales` of this process's rows,
    gathered: NaN for a sample to drop (every entry NaN is trl's "unscorable": left out of the group
    baseline, advantage 0, no gradient), the re-weighting factor for ``on_error: reweight``, else 1.
    """
    import math

    import torch
    from accelerate.utils import gather

    local = rewards_per_func[process_index * n_local:(process_index + 1) * n_local]
    applied = [(~torch.isnan(local[:, j])).tolist() for j in range(local.shape[1])]
    scales = combined.sample_scales(applied)
    factors = torch.tensor([math.nan if s is None else s for s in scales], dtype=rewards_per_func.dtype,
                           device=rewards_per_func.device)
    factors = gather(factors)
    return rewards_per_func * factors.unsqueeze(1), int(torch.isnan(factors).sum())


def trainer_class(base, share_prompt: bool):
    """trl's GRPOTrainer/RLOOTrainer with our reward-failure semantics; with `share_prompt`, its log-prob
    passes also share each group's prompt."""

    class RecipeRewardTrainer(base):
        combined = None  # the recipe's CombinedReward (set by build_trainer)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            if self.combined is None:
                return rewards_per_func
            rewards_per_func, dropped = drop_or_reweight_failures(
                rewards_per_func, self.combined, len(prompts), self.accelerator.process_index)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["rewards/dropped_samples"].append(float(dropped))  # a failed source: never 0
            return rewards_per_func

    RecipeRewardTrainer.__name__ = f"Recipe{base.__name__}"
    if not share_prompt:
        return RecipeRewardTrainer

    class SharedPromptTrainer(RecipeRewardTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args,
                                               **kwargs):
            multimodal = args or any(v is not None for k, v in kwargs.items()
                                     if k not in ("batch_size", "compute_entropy", "compute_aux_loss"))
            if multimodal:  # image inputs are tied to rows: leave them to trl
                return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                                  logits_to_keep, *args, **kwargs)
            # columns before the completion hold the left-padded prompt (trl's layout)
            with shared_prompt.active(prompt_width=input_ids.shape[1] - logits_to_keep):
                return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                                  logits_to_keep, **kwargs)

    SharedPromptTrainer.__name__ = f"SharedPrompt{base.__name__}"
    return SharedPromptTrainer


def online_defaults(recipe, run_dir) -> dict:
    """CPU-sized defaults: trl's own (512 new tokens, 8 generations) are meant for GPUs."""
    defaults = common.trainer_defaults(recipe, run_dir)
    defaults.update({"max_completion_length": 16, "num_generations": 8, "logging_steps": 10,
                     "disable_dropout": True})
    return defaults


def trainer_config(recipe, run_dir, reward_weights: list | None = None):
    """trl's GRPOConfig / RLOOConfig this recipe trains with (built by `align validate` too).

    The sources' weights become trl's reward_weights unless the recipe sets train.reward_weights; without
    built sources (validation), the weights the reward specs name.
    """
    import trl

    config_name, _ = TRAINERS[recipe.stage]
    defaults = online_defaults(recipe, run_dir)
    if "reward_weights" not in recipe.train:
        defaults["reward_weights"] = reward_weights if reward_weights is not None else \
            [float(spec.get("weight", 1.0)) for spec in recipe.reward]
    if recipe.environment is not None:  # max_turns assistant turns = the first and max_turns - 1 after tool results
        defaults["max_tool_calling_iterations"] = recipe.environment.max_turns - 1
    return common.build_trainer_config(recipe, getattr(trl, config_name), defaults)


def build_trainer(recipe, model, tokenizer, rewards, splits, run_dir):
    import trl

    _, trainer_name = TRAINERS[recipe.stage]
    args = trainer_config(recipe, run_dir, rewards.weights)
    sharing = shared_prompt.install_for_recipe(recipe, model)
    environment, malformed = {}, None
    if recipe.environment is not None:  # trl's own environment_factory / tools (alignment/envs/trl_bridge.py)
        from alignment.envs import trl_bridge

        environment = trl_bridge.trl_arguments(recipe.environment, tokenizer)
        malformed = trl_bridge.install_parser(tokenizer)
    trainer = trainer_class(getattr(trl, trainer_name), sharing)(
        reward_funcs=rewards.sources, **environment,
        **common.trainer_inputs(recipe, model, tokenizer, args, splits.train, splits.eval))
    trainer.combined = rewards
    trainer.malformed_calls = malformed
    if sharing and getattr(trainer, "ref_model", None) is not None:  # trl loads its reference itself
        shared_prompt.install(trainer.ref_model)
    trainer.share_prompt = sharing
    return trainer


def health_guard(options):
    from alignment.guards import rl_health_guard

    bounds = [("kl", options["max_kl"], "max"), ("entropy", options["min_entropy"], "min"),
              ("eos_rate", options["min_eos_rate"], "min")]
    return rl_health_guard(bounds, options["warn_or_stop"])


def run(recipe) -> dict:
    import reward as reward_sources

    started, run_dir, resume_from = common.start_run(recipe)
    splits = data.load(recipe.data, "prompt", seed=recipe.seed)
    rewards = reward_sources.build([dict(spec) for spec in recipe.reward])
    model, tokenizer = common.load_policy(recipe)
    common.ensure_loadable_path(model, tokenizer, run_dir)  # trl reloads the reference from this path
    before = common.evaluate_policy(model, tokenizer, recipe.eval) if recipe.options["evaluate_before"] else None
    trainer = build_trainer(recipe, model, tokenizer, rewards, splits, run_dir)
    health = health_guard(recipe.options)
    trainer.add_callback(health)
    common.train(trainer, recipe, run_dir, resume_from)
    health.check(run_dir)
    after = common.evaluate_policy(trainer.model, tokenizer, recipe.eval)
    from alignment.metrics import shared_rl_metrics

    # trl's step logs with the shared names added (kl/per_token, kl/per_sequence, reward/total ...)
    logged = [{**entry, **shared_rl_metrics(entry)} for entry in trainer.state.log_history if "reward" in entry]
    metrics = {
        "stage": recipe.stage,
        "train_loss": common.final_train_loss(trainer),
        "train_steps": trainer.state.global_step,
        "train_seconds": round(time.time() - started, 1),
        "train_reward_first": logged[0]["reward/total"] if logged else None,
        "train_reward_last": logged[-1]["reward/total"] if logged else None,
        "train_kl_per_token_last": logged[-1].get("kl/per_token") if logged else None,
        "train_kl_per_sequence_last": logged[-1].get("kl/per_sequence") if logged else None,
        # tokens the log-prob passes did not run thanks to the shared prompts (0.6 = 60% fewer)
        **shared_prompt.outcome(trainer.share_prompt, trainer.model, getattr(trainer, "ref_model", None)),
        "reward_failures": {source.name: source.stats.as_dict() for source in rewards.sources},
        # tool calls the parser could not read, each answered with an error observation (environment recipes)
        **({"env_malformed_calls": trainer.malformed_calls.count} if trainer.malformed_calls is not None else {}),
        "before": before,
        "after": after,
        "data": [vars(report) for report in splits.reports],
    }
    return common.finish_run(recipe, run_dir, trainer.model, tokenizer, metrics, started)
