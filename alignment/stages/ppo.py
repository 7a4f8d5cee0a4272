"""Stage `ppo`: our PPO trainer (alignment.ppo) with a learned critic, on the shared reward sources.

    align run recipes/tiny/ppo_rule.yaml     # the verifiable answer rule as the reward
    align run recipes/tiny/ppo.yaml          # a learned reward model (runs/tiny/reward_model)

Models: the policy is ``model.name_or_path`` (every weight trained, or a LoRA
adapter with ``model.lora``); the reference is a frozen copy of the starting
policy, or, with LoRA, the same network with the adapter disabled (no second
copy in memory).  The critic is ``options.critic``: ``value_head`` (one linear
layer on the policy's last hidden state) or ``separate`` (its own network,
initialised from ``options.critic_init`` - a reward-model directory, as the
reference recipe of Huang et al. 2024 does - or from a copy of the policy).

Rewards: the recipe's ``reward:`` list (``reward.build``: rules, Python
functions, reward-model directories, URLs) with its weights; conversational
prompts reach the sources as messages and completions as assistant messages
(trl's convention, so a GRPO reward function works unchanged); dataset columns
besides ``prompt`` (e.g. ``answer``) arrive as keyword arguments.

Environment: with `environment:` in the recipe each prompt row is an episode
(alignment.ppo.episodes: the policy samples every turn, the environment's
tokens are context and never trained); the reward sources score the finished
conversation (its last assistant message), and the held-out numbers come from
greedy episodes (alignment.evaluation.episodes: accuracy, tool-call and
malformed-call rates, turns, a few transcripts).

Run directory: the policy as a plain transformers directory (LoRA merged), the
critic beside it (``value_head.safetensors`` or ``critic/``), ``metrics.jsonl``
(one JSON object per PPO step: ``step`` and the trainer's metric names),
``metrics.json`` (held-out before/after, train reward first/last, KL, time
split) and ``checkpoints/checkpoint-<step>`` (every ``options.save_steps``,
the last ``options.save_total_limit`` kept).  SIGINT/SIGTERM finishes the
step, saves a checkpoint and stops; ``--resume`` continues from it.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from alignment import data
from alignment.checkpoint import CHECKPOINTS
from alignment.errors import RecipeError
from alignment.recipe import check, positive
from alignment.stages import common

ORIGINAL_PROMPT = "_original_prompt"  # the row's prompt as written (messages), handed to the reward sources


@dataclass(frozen=True)
class Options:
    """`options:` of a ppo recipe."""

    critic: Literal["value_head", "separate"] = "value_head"  # value head on the policy, or its own network
    critic_init: Union[str, None] = None  # separate critic: start from this reward-model dir; null = the policy
    evaluate_before: bool = True  # held-out metrics of the starting policy, for the before/after table
    save_steps: int = field(default=50, metadata=check(positive))  # checkpoint every this many PPO steps
    save_total_limit: int = field(default=2, metadata=check(positive))  # checkpoints kept (the newest)
    max_train_seconds: Union[float, None] = field(default=None, metadata=check(positive))  # stop early: controls
    progress_bar: bool = True  # tqdm bar with reward and KL
    log_completions: int = 4  # sampled completions written to completions.jsonl every logging_steps; 0 = none


# ------------------------------------------------------------------ set-up


def build_config(recipe):
    """PPOConfig from the recipe's `train:` section (the recipe's seed unless `train.seed` is set)."""
    from alignment.ppo import PPOConfig

    values = {"seed": recipe.seed, **dict(recipe.train)}
    try:
        return PPOConfig(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{recipe.source_path}: train: PPOConfig rejected the settings: {exc}") from None


def check_options(recipe) -> None:
    """Settings that cannot work, refused before any model is loaded."""
    options, where = recipe.options, recipe.source_path
    if options["critic_init"] is not None and not needs_critic(recipe):
        raise RecipeError(f"{where}: options.critic_init is set but train.advantage_estimator "
                          f"{dict(recipe.train).get('advantage_estimator')!r} learns no critic: remove critic_init")
    if options["critic_init"] is not None:
        if options["critic"] != "separate":
            raise RecipeError(f"{where}: options.critic_init is set but options.critic is "
                              f"{options['critic']!r}; the value head starts small and fresh: set critic: separate")
        if not (Path(options["critic_init"]) / "config.json").is_file():
            raise RecipeError(f"{where}: options.critic_init: {options['critic_init']} is not a model directory "
                              "(no config.json); train one with the reward_model stage")
    if recipe.model.quantization and options["critic"] == "separate" and options["critic_init"] is None:
        raise RecipeError(f"{where}: options.critic: separate copies the policy, which model.quantization makes a "
                          "quantized network every weight of which the critic would have to train; set "
                          "options.critic_init to a reward-model directory (loaded in full precision), or use "
                          "critic: value_head")


def needs_critic(recipe) -> bool:
    """Whether the recipe's `train.advantage_estimator` (default gae) learns a critic; the others build none."""
    from alignment.ppo.advantages import estimator_spec

    return estimator_spec(dict(recipe.train).get("advantage_estimator", "gae")).needs_critic


def build_models(recipe, model, tokenizer):
    """``(policy, ref_policy, critic)`` for PPOTrainer from the loaded starting model.

    A critic (``options.critic``) is built only for an estimator that learns one (gae); for the
    critic-free ones (grpo, rloo, reinforce_pp, ...) the policy is the plain LM and ``critic`` is None.
    """
    from policies.value import build_critic

    options = recipe.options
    if not needs_critic(recipe):
        if common.lora_config(recipe.model.lora) is not None:
            from peft import get_peft_model

            return get_peft_model(model, common.lora_config(recipe.model.lora)), None, None
        return model, copy.deepcopy(model), None
    init_from = None
    if options["critic"] == "separate" and options["critic_init"]:
        init_from = load_critic_init(recipe, tokenizer)
    if options["critic"] == "separate":  # before LoRA wraps the model: the critic copies the plain weights
        _, critic = build_critic("separate", model, init_from=init_from)
    lora = common.lora_config(recipe.model.lora)
    if lora is not None:
        from peft import get_peft_model

        model, ref_policy = get_peft_model(model, lora), None  # reference = the adapter disabled
    else:
        ref_policy = copy.deepcopy(model)  # frozen by the trainer
    if options["critic"] == "value_head":
        model, critic = build_critic("value_head", model)
    return model, ref_policy, critic


def load_critic_init(recipe, tokenizer):
    """The reward model a separate critic starts from; its vocabulary must be the policy's."""
    import policies

    path = recipe.options["critic_init"]
    model, critic_tokenizer = policies.load(path, dtype=recipe.model.dtype, task="sequence_classification",
                                            trust_remote_code=recipe.model.trust_remote_code)
    if critic_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RecipeError(f"{recipe.source_path}: options.critic_init: {path} has a different tokenizer from "
                          f"{recipe.model.name_or_path}; the critic reads the policy's token ids")
    return model


def prompt_rows(dataset, tokenizer, max_prompt_tokens: int | None = None) -> tuple[list[dict], int]:
    """Rows ``{"prompt": rendered text, ORIGINAL_PROMPT: as written, **other columns}`` and the count dropped.

    Conversational prompts go through the chat template with the generation prompt.
    """
    from alignment.evaluation.generate import render_prompt

    rows, dropped = [], 0
    for row in dataset.to_list():
        text = render_prompt(tokenizer, row["prompt"])
        if max_prompt_tokens is not None and len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
            dropped += 1
            continue
        rows.append({**row, "prompt": text, ORIGINAL_PROMPT: row["prompt"]})
    return rows, dropped


class RecipeReward:
    """The recipe's combined reward as the trainer's ``reward_fn``; keeps each source's metrics of the last call."""

    __name__ = "total"  # the trainer logs its mean as reward/total
    wants_completion_ids = True  # the trainer passes the sampled token ids, as trl does (trl.rewards read them)
    wants_conversations = True  # and an episode's messages (environment recipes), as trl's multi-turn GRPO does

    def __init__(self, combined):
        from reward.base import is_conversation

        self.combined, self.is_conversation, self.last_metrics, self.last_samples = combined, is_conversation, {}, []

    def __call__(self, prompts, completions, **columns):
        originals = columns.pop(ORIGINAL_PROMPT, None) or prompts
        conversations = columns.pop("completion_messages", None)
        texts = list(completions)
        if conversations is not None:  # an episode: the sources read its last assistant message, as in trl's GRPO
            completions = list(conversations)
        else:
            completions = [[{"role": "assistant", "content": c}] if self.is_conversation(p) else c
                           for p, c in zip(originals, texts)]
        result = self.combined(list(originals), completions, **columns)
        self.last_metrics = result.metrics
        # kept for completions.jsonl: the prompt as the data has it, the completion's text, its total score
        self.last_samples = [{"prompt": p, "completion": c, "reward": r}
                             for p, c, r in zip(originals, texts, result.total)]
        return result.total


# ------------------------------------------------------------------ training loop


def save_checkpoint(trainer, run_dir: Path, keep: int) -> Path:
    """checkpoints/checkpoint-<step> (written whole or not at all), then drop all but the newest `keep`."""
    from alignment.guards import disk_error

    root = run_dir / CHECKPOINTS
    try:
        path = trainer.save(root / f"checkpoint-{trainer.step_count}")
    except Exception as exc:  # a full disk arrives as OSError, SafetensorError or RuntimeError
        failed_write = disk_error(exc, run_dir)  # removes checkpoint-<step>.tmp; the last whole one is kept
        if failed_write is None:
            raise
        raise failed_write from exc
    if trainer.accelerator.is_main_process:
        saved = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in root.glob("checkpoint-*")
                       if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())
        for _, old in saved[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def train(trainer, reward_fn, run_dir: Path, options, metrics_log, eval_spec=None) -> list[dict]:
    """PPO steps up to the configured total, with metrics.jsonl, checkpoints, a progress bar and clean stops.

    Every step's record goes through `metrics_log` (an alignment.metrics.MetricsLog: the file and the
    trackers). With `eval_spec.every_steps`, the held-out metrics are logged every that many steps as well.
    """
    from tqdm.auto import tqdm

    from alignment.guards import Interrupted, SignalLatch, TimeBudget

    total = trainer.config.num_steps
    main = trainer.accelerator.is_main_process
    bar = tqdm(total=total, initial=trainer.step_count, desc="ppo", disable=not (main and options["progress_bar"]))
    budget, stopped_early = TimeBudget(options["max_train_seconds"]), False
    with SignalLatch("PPO step") as stop:
        while trainer.step_count < total:
            metrics = ppo_step(trainer)
            metrics_log.write({**reward_fn.last_metrics, **metrics}, step=trainer.step_count)
            if trainer.step_count % trainer.config.logging_steps == 0:
                metrics_log.write_completions(trainer.step_count,
                                              reward_fn.last_samples[:options.get("log_completions", 0)])
            if eval_spec is not None and eval_spec.every_steps and trainer.step_count % eval_spec.every_steps == 0:
                common.evaluate_during_training(language_model(trainer), trainer.tokenizer, eval_spec,
                                                trainer.step_count, metrics_log)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['objective/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if main and not options["progress_bar"] and trainer.step_count % trainer.config.logging_steps == 0:
                print(f"ppo step {trainer.step_count}/{total}: score {metrics['objective/score']:.3f} "
                      f"kl {metrics['objective/kl']:.3f} entropy {metrics['objective/entropy']:.3f} "
                      f"eos_rate {metrics['val/eos_rate']:.2f}", flush=True)
            stopped_early = budget.exhausted() and trainer.step_count < total
            if stop.signal_name or trainer.step_count % options["save_steps"] == 0 or stopped_early:
                save_checkpoint(trainer, run_dir, options["save_total_limit"])
            if stop.signal_name:
                bar.close()
                raise Interrupted(f"stopped by {stop.signal_name} after PPO step {trainer.step_count}; checkpoint "
                                  f"saved under {run_dir / CHECKPOINTS}; run again with --resume to continue")
            if stopped_early:
                break
    bar.close()
    if trainer.step_count % options["save_steps"] and not stopped_early:
        save_checkpoint(trainer, run_dir, options["save_total_limit"])
    return read_log(run_dir)


def ppo_step(trainer) -> dict:
    """One PPO step; out of memory is a TrainingError naming the settings that decide memory."""
    from alignment.guards import is_out_of_memory, out_of_memory_error

    try:
        return trainer.step()
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        cfg = trainer.config
        raise out_of_memory_error(
            f"PPO step {trainer.step_count + 1}",
            {"train.batch_size": cfg.batch_size, "train.mini_batch_size": cfg.mini_batch_size,
             "train.gradient_accumulation_steps": cfg.gradient_accumulation_steps,
             "train.max_new_tokens": cfg.max_new_tokens},
            "Lower train.mini_batch_size (raising train.gradient_accumulation_steps keeps the update size), "
            "train.batch_size (the rollout batch) or train.max_new_tokens", exc) from exc


def read_log(run_dir: Path) -> list[dict]:
    """The per-step PPO records of metrics.jsonl (the mid-run `eval/` records left out)."""
    from alignment.metrics import read_records

    return [r for r in read_records(run_dir) if not any(key.startswith("eval/") for key in r)]


# ------------------------------------------------------------------ results


def language_model(trainer):
    """The trained causal LM (a peft model with LoRA), without the value head."""
    from policies.value import CausalLMWithValueHead

    policy = trainer.accelerator.unwrap_model(trainer.policy)
    return policy.pretrained_model if isinstance(policy, CausalLMWithValueHead) else policy


def save_critic(trainer, tokenizer, run_dir: Path) -> None:
    """``value_head.safetensors`` beside the policy weights, or ``critic/`` (a sequence-classification dir)."""
    from safetensors.torch import save_file

    from policies.value import VALUE_HEAD_FILE, CausalLMWithValueHead

    if not trainer.accelerator.is_main_process:
        return
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    if trainer.critic is None and not isinstance(policy, CausalLMWithValueHead):
        return  # a critic-free estimator: nothing to save
    if isinstance(policy, CausalLMWithValueHead):
        state = {k: v.detach().contiguous().cpu() for k, v in policy.v_head.state_dict().items()}
        save_file(state, str(run_dir / VALUE_HEAD_FILE))
    else:
        critic_dir = run_dir / "critic"
        shutil.rmtree(critic_dir, ignore_errors=True)
        trainer.accelerator.unwrap_model(trainer.critic).save_pretrained(str(critic_dir))
        tokenizer.save_pretrained(str(critic_dir))


def summarize(log: list[dict]) -> dict:
    """Train reward first/last (and means over a few steps), KL last and max, time split, from the per-step log."""
    if not log:
        return {}

    def total(key):
        return round(math.fsum(entry.get(key, 0.0) for entry in log), 2)

    kls, scores = [entry["kl/per_sequence"] for entry in log], [entry["reward/total"] for entry in log]
    window = max(1, min(5, len(log) // 2))  # one batch is noisy: also the mean of the first and last few steps
    return {
        "train_reward_first": scores[0],
        "train_reward_last": scores[-1],
        "train_reward_window": {"steps": window, "first": math.fsum(scores[:window]) / window,
                                "last": math.fsum(scores[-window:]) / window},
        "train_kl_per_sequence_last": kls[-1],
        "train_kl_per_sequence_max": max(kls),
        "train_kl_per_token_last": log[-1]["kl/per_token"],
        "train_entropy_last": log[-1]["entropy/per_token"],
        "train_eos_rate_last": log[-1]["val/eos_rate"],
        "time_split": {"generation": total("time/generation"), "scoring": total("time/scoring"),
                       "training": total("time/training")},
    }


@dataclass
class RLInputs:
    """What every stage on our RL loop (ppo, online_dpo) loads before it builds its trainer."""

    started: float
    run_dir: Path
    resume_from: str | None
    splits: object  # alignment.data splits of the prompt data
    rewards: object  # reward.combine.CombinedReward
    model: object
    tokenizer: object
    prompts: list[dict]
    prompts_too_long: int
    before: dict | None  # held-out metrics of the starting policy


def load_inputs(recipe, config) -> RLInputs:
    """Run directory, prompt data, reward sources, the starting policy and its held-out numbers.

    `config` is the stage's validated trainer config (built before anything heavy).
    """
    import reward as reward_sources

    started, run_dir, resume_from = common.start_run(recipe)
    splits = data.load(recipe.data, "prompt", seed=recipe.seed)
    rewards = reward_sources.build([dict(spec) for spec in recipe.reward])
    model, tokenizer = common.load_policy(recipe)
    if config.use_vllm:  # vLLM (colocate) loads the starting weights from model.name_or_path
        common.ensure_loadable_path(model, tokenizer, run_dir)
    if getattr(recipe, "environment", None) is not None:
        # an episode renders the prompt itself, with the environment's tools: the rows keep their messages
        prompts, too_long = episode_rows(splits.train, recipe), 0
    else:
        prompts, too_long = prompt_rows(splits.train, tokenizer, recipe.data.max_prompt_tokens)
    before = held_out(recipe, model, tokenizer) if recipe.options["evaluate_before"] else None
    return RLInputs(started, run_dir, resume_from, splits, rewards, model, tokenizer, prompts, too_long, before)


def episode_rows(dataset, recipe) -> list[dict]:
    """The rows of an environment recipe as they are (the prompt as messages): what each episode's reset gets."""
    rows = dataset.to_list()
    for i, row in enumerate(rows):
        if isinstance(row.get("prompt"), str):
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
        elif not isinstance(row.get("prompt"), list):
            raise RecipeError(f"{recipe.source_path}: data.train row {i}: an environment needs a 'prompt' (text or "
                              f"messages), got {row.get('prompt')!r:.80}")
    return rows


def held_out(recipe, model, tokenizer) -> dict | None:
    """The stage's held-out numbers: greedy episodes with an environment, else the single-turn quick metrics."""
    from alignment.distributed import is_main_process

    environment = getattr(recipe, "environment", None)
    if environment is None or recipe.eval is None or not recipe.eval.data:
        return common.evaluate_policy(model, tokenizer, recipe.eval)
    if not is_main_process():
        return None
    from alignment.evaluation.episodes import episode_task_metrics

    return episode_task_metrics(model, tokenizer, environment, recipe.eval)


def train_logged(trainer, reward_fn, recipe, inputs: RLInputs) -> list[dict]:
    """Resume if asked, then :func:`train` with the run's metrics log (and trackers) open; the per-step log."""
    metrics_log = common.open_metrics_log(recipe, inputs.run_dir, enabled=trainer.accelerator.is_main_process)
    if inputs.resume_from:
        trainer.load(inputs.resume_from)
        metrics_log.trim(trainer.step_count)  # the steps after the checkpoint are trained and logged again
    try:
        return train(trainer, reward_fn, inputs.run_dir, recipe.options, metrics_log, recipe.eval)
    finally:
        metrics_log.close()


def rl_metrics(stage: str, trainer, log: list[dict], inputs: RLInputs, after: dict | None) -> dict:
    """metrics.json of a stage on our RL loop: steps, seconds, the log's summary, reward failures, before/after."""
    return {
        "stage": stage,
        "train_steps": trainer.step_count,
        "train_seconds": round(time.time() - inputs.started, 1),
        **summarize(log),
        "reward_failures": {source.name: source.stats.as_dict() for source in inputs.rewards.sources},
        "before": inputs.before,
        "after": after,
        "data": [vars(report) for report in inputs.splits.reports] + [{"prompts_longer_than_max":
                                                                        inputs.prompts_too_long}],
    }


def accelerator_for(recipe, config):
    """Our loop's accelerator at the recipe's `precision:` (ppo and online_dpo)."""
    from alignment.ppo.trainer import make_accelerator
    from alignment.precision import for_recipe

    return make_accelerator(config, for_recipe(recipe).mixed_precision)


def run(recipe) -> dict:
    from alignment.ppo import PPOTrainer

    config = build_config(recipe)  # validated before anything heavy
    check_options(recipe)
    inputs = load_inputs(recipe, config)
    policy, ref_policy, critic = build_models(recipe, inputs.model, inputs.tokenizer)
    reward_fn = RecipeReward(inputs.rewards)
    trainer = PPOTrainer(config, policy, ref_policy, critic, inputs.tokenizer, reward_fn, inputs.prompts,
                         accelerator=accelerator_for(recipe, config), environment=recipe.environment)
    log = train_logged(trainer, reward_fn, recipe, inputs)
    lm = language_model(trainer)
    metrics = rl_metrics("ppo", trainer, log, inputs, held_out(recipe, lm, inputs.tokenizer))
    metrics["critic"] = recipe.options["critic"] if needs_critic(recipe) else None
    inputs.rewards.close()
    save_critic(trainer, inputs.tokenizer, inputs.run_dir)
    return common.finish_run(recipe, inputs.run_dir, lm, inputs.tokenizer, metrics, inputs.started,
                             note=_kl_note(metrics))


def _kl_note(metrics: dict) -> str:
    if metrics.get("train_kl_per_sequence_last") is None:
        return ""
    return f" | train reward {metrics['train_reward_first']:.3f} -> {metrics['train_reward_last']:.3f}, " \
           f"KL {metrics['train_kl_per_sequence_last']:.3f} nats/response"
