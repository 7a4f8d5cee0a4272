"""Per-stage workloads: the same task run by our stage (from its recipe) and by the peer.

"ours" = ``alignment.stages.<stage>.run(recipe)`` on ``recipes/tiny/<stage>.yaml``
with overrides for the model (the saved tiny preset), steps, batch size,
output folder, logging, and everything outside the training loop switched off
(``eval: null``, ``data.eval: null``, ``options.evaluate_before: false`` where
the stage has it, no held-out KL samples).

"peer" = the same trl trainer used directly, as trl's example scripts do:
``load_dataset("json")``, ``from_pretrained`` of the same saved model, the
trainer's config with **trl's defaults** except

* what a competent CPU user changes: ``bf16=False``, ``gradient_checkpointing=False``,
  ``use_cpu=True``, ``report_to="none"``;
* what defines the task, taken from the same recipe so both sides solve the
  same problem and the final metric is comparable: batch size, max length,
  steps, learning rate and schedule, ``beta``, ``loss_type``, generation
  count / length / temperature (:data:`TASK_KEYS`);
* ``save_strategy="no"`` and a common ``logging_steps`` on both sides, so
  neither writes checkpoints inside the timed loop.

Only ``trainer.train()``'s loop is timed (:mod:`benchmarks.measure`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "tiny"
DATA = ROOT / "data" / "tiny_arith"

TRL_STAGES = ("sft", "reward_model", "dpo", "grpo", "rloo")
STAGES = TRL_STAGES + ("ppo",)

# The recipe keys that define the task (not the speed); the peer gets the recipe's values for these.
TASK_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "max_length",
    "max_prompt_length", "max_completion_length", "num_generations", "temperature", "beta", "loss_type",
    "loss_weights", "label_smoothing", "center_rewards_coefficient", "logging_steps", "seed",
)

# What our stages use where the recipe says nothing, for the task keys (so the peer matches).
OUR_STAGE_DEFAULTS = {
    "sft": {"max_length": 256},
    "grpo": {"max_completion_length": 16, "num_generations": 8},
    "rloo": {"max_completion_length": 16, "num_generations": 8},
}

PEER_CPU_SETTINGS = {"bf16": False, "gradient_checkpointing": False, "use_cpu": True, "report_to": "none"}

# Stage -> (trl config, trl trainer, training data file, model kind).
TRL = {
    "sft": ("SFTConfig", "SFTTrainer", "sft.jsonl", "policy"),
    "reward_model": ("RewardConfig", "RewardTrainer", "preference_rm.jsonl", "reward"),
    "dpo": ("DPOConfig", "DPOTrainer", "preference.jsonl", "policy"),
    "grpo": ("GRPOConfig", "GRPOTrainer", "rl_prompts.jsonl", "policy"),
    "rloo": ("RLOOConfig", "RLOOTrainer", "rl_prompts.jsonl", "policy"),
}

# Final metric: the last logged value of the first key found.
METRIC_KEYS = {
    "sft": ("loss",),
    "reward_model": ("loss",),
    "dpo": ("loss",),
    "grpo": ("reward",),
    "rloo": ("reward",),
}


class Pending(Exception):
    """Our side of a stage cannot run yet (its code is not there or not usable); the message says why."""


@dataclasses.dataclass
class Spec:
    """One run: which stage and side, on which saved models, for how many steps."""

    stage: str
    side: str  # "ours" or "peer"
    assets: dict  # benchmarks.assets.build(...)
    steps: int
    workdir: str
    batch: int | None = None
    logging_steps: int | None = None
    max_samples: int | None = None  # first N rows of the training file, on both sides (None: all)
    ours_set: tuple = ()  # extra recipe overrides for our side (speed-lever experiments)
    peer_set: tuple = ()  # extra trainer-config settings for the peer (key=value, YAML values)
    precision: str = "fp32"  # both sides: our recipe's `precision:`, the peer's `bf16` flag


def recipe_path(stage: str) -> Path:
    return RECIPES / f"{stage}.yaml"


def logging_steps(spec: Spec) -> int:
    return spec.logging_steps or max(1, spec.steps // 5)


def model_dir(spec: Spec) -> str:
    kind = TRL[spec.stage][3] if spec.stage in TRL else "policy"
    return spec.assets[kind]


def our_overrides(spec: Spec, with_ours_set: bool = True) -> list[str]:
    """Recipe overrides that make our stage run exactly the benchmarked training loop and little else."""
    from alignment.stages import stage_spec

    overrides = [
        f"model.name_or_path={model_dir(spec)}",
        f"output_dir={Path(spec.workdir) / 'ours-run'}",
        "eval=null",
        "data.eval=null",
        "data.eval_fraction=0.0",
        f"train.max_steps={spec.steps}",
        f"train.logging_steps={logging_steps(spec)}",
        "train.save_strategy='no'",
        f"precision={spec.precision}",  # never auto here: the peer runs the same precision, named
    ]
    if spec.batch:
        overrides.append(f"train.per_device_train_batch_size={spec.batch}")
    if spec.max_samples:
        overrides.append(f"data.max_samples={spec.max_samples}")
    try:
        options = {f.name for f in dataclasses.fields(stage_spec(spec.stage).options_class())}
    except Exception as exc:  # the stage module is not there yet
        raise Pending(f"stage {spec.stage!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if "evaluate_before" in options:
        overrides.append("options.evaluate_before=false")
    if "kl_samples" in options:
        overrides.append("options.kl_samples=0")
    if "center" in options:  # reward model: the bias measurement after training samples 256 completions
        overrides += ["options.center=false", "options.center_policy=null"]
    return overrides + (list(spec.ours_set) if with_ours_set else [])


def load_our_recipe(spec: Spec, with_ours_set: bool = True):
    from alignment.recipe import load

    path = recipe_path(spec.stage)
    if not path.is_file():
        raise Pending(f"{path.relative_to(ROOT)} does not exist yet")
    return load(path, our_overrides(spec, with_ours_set))


def peer_task_settings(spec: Spec) -> dict:
    """The task keys for the peer, read from the same recipe with the same overrides as ours (not `ours_set`)."""
    recipe = load_our_recipe(spec, with_ours_set=False)
    settings = dict(OUR_STAGE_DEFAULTS.get(spec.stage, {}))
    settings.update({k: _plain(v) for k, v in recipe.train.items() if k in TASK_KEYS})
    settings["seed"] = recipe.seed
    return settings, recipe


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _parse_sets(pairs) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        out[key.strip()] = yaml.safe_load(text) if text else ""
    return out


# ---------------------------------------------------------------------------------------------- ours


def run_ours(spec: Spec) -> dict:
    from benchmarks.measure import METER, instrument_trainers

    recipe = load_our_recipe(spec)
    instrument_trainers()
    module = _stage_module(spec.stage)
    module.run(recipe)
    trainer = METER.trainer
    if trainer is None or METER.seconds is None:
        raise RuntimeError(f"stage {spec.stage} ran no transformers Trainer loop: nothing was timed")
    return _trainer_result(spec, trainer, recipe_overrides=our_overrides(spec))


def _stage_module(stage: str):
    from alignment.stages import stage_spec

    try:
        return stage_spec(stage).load_module()
    except Exception as exc:
        raise Pending(f"stage {stage!r} cannot be loaded: {type(exc).__name__}: {exc}") from None


def heldout_preference(spec: Spec, trainer) -> dict:
    """Held-out numbers of a trained DPO policy on data/tiny_arith/preference_eval.jsonl (500 pairs), measured
    the same way for both sides after the timed loop: preference accuracy (the policy ranks the pair right) and
    implicit-reward accuracy against the starting model (the saved preset)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.stages import preference_common as pref

    tokenizer = AutoTokenizer.from_pretrained(spec.assets["policy"])
    with open(DATA / "preference_eval.jsonl", encoding="utf-8") as handle:
        pairs = pref.tokenize_pairs(tokenizer, [json.loads(line) for line in handle])
    model = trainer.accelerator.unwrap_model(trainer.model)
    start = AutoModelForCausalLM.from_pretrained(spec.assets["policy"], dtype=torch.float32)
    model.eval()
    after = pref.pair_logps(model, tokenizer, pairs)
    before = pref.pair_logps(start, tokenizer, pairs)
    metrics = pref.pair_metrics(*after, start=before, beta=trainer.args.beta)
    return {k: metrics[k] for k in ("pairs", "preference_accuracy", "reward_accuracy", "reward_margin")}


def _trainer_result(spec: Spec, trainer, **extra) -> dict:
    from benchmarks.measure import METER, last_logged, matmul_parameters, summarise, trainer_settings

    if spec.stage == "dpo":
        extra["heldout"] = heldout_preference(spec, trainer)
    if spec.side == "ours":
        from alignment import shared_prompt

        # tokens counts the rows as trl lays them out (the same work as the peer's); with shared prompts
        # the decoder computed only this share of them, which is what MFU (hardware use) must count
        saved = shared_prompt.saved_fraction(trainer.model, getattr(trainer, "ref_model", None))
        extra["computed_token_share"] = 1.0 - saved if saved else 1.0
    args = trainer.args
    steps = trainer.state.global_step
    samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    return summarise(
        METER,
        samples=samples,
        matmul_params=matmul_parameters(model),
        metric=last_logged(trainer, *METRIC_KEYS[spec.stage]),
        settings=trainer_settings(trainer),
        extra={"steps": steps, **extra},
    )


# ---------------------------------------------------------------------------------------------- peer


def answer_reward(prompts, completions, answer, **kwargs):
    """The peer's reward function, written as a trl user would: 1.0 if the first integer is the answer."""
    import re

    scores = []
    for completion, expected in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        found = re.search(r"-?\d+", text)
        scores.append(1.0 if found and int(found.group()) == int(expected) else 0.0)
    return scores


def run_peer(spec: Spec) -> dict:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from benchmarks.measure import instrument_trainers

    config_name, trainer_name, data_file, kind = TRL[spec.stage]
    task, recipe = peer_task_settings(spec)
    args = {**task, **PEER_CPU_SETTINGS, "bf16": spec.precision == "bf16",
            "output_dir": str(Path(spec.workdir) / "peer-run"), "save_strategy": "no"}
    args.update(_parse_sets(spec.peer_set))
    set_seed(args["seed"])
    path = spec.assets[kind]
    tokenizer = AutoTokenizer.from_pretrained(path)
    if kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # the recipe's training file, so both sides read the same rows (the table's file is the fallback)
    recipe_file = recipe.data.train if isinstance(recipe.data.train, str) else None
    path_of_data = ROOT / recipe_file if recipe_file and (ROOT / recipe_file).is_file() else DATA / data_file
    dataset = load_dataset("json", data_files=str(path_of_data), split="train")
    if recipe.data.max_samples:
        dataset = dataset.select(range(min(recipe.data.max_samples, len(dataset))))
    config = getattr(trl, config_name)(**args)
    kwargs = {"model": model, "args": config, "train_dataset": dataset, "processing_class": tokenizer}
    if spec.stage in ("grpo", "rloo"):
        kwargs["reward_funcs"] = answer_reward
    trainer = getattr(trl, trainer_name)(**kwargs)
    instrument_trainers()
    trainer.train()
    return _trainer_result(spec, trainer, peer_args=args)


# ---------------------------------------------------------------------------------------------- PPO


PPO_SETTINGS = {
    "batch_size": 8,  # prompts per rollout (trl: per_device_train_batch_size, 1 mini-batch)
    "mini_batch_size": 8,
    "ppo_epochs": 4,
    "max_new_tokens": 32,  # trl: response_length
    "temperature": 0.7,  # both defaults
    "kl_coef": 0.05,  # both defaults
    "learning_rate": 3e-6,  # both defaults
}


def ppo_prompts(tokenizer, limit: int | None = None) -> list[dict]:
    """data/tiny_arith/rl_prompts.jsonl rendered with the chat template (generation prompt added)."""
    import json

    rows = []
    with open(DATA / "rl_prompts.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": text})
            if limit and len(rows) >= limit:
                break
    return rows


def run_ours_ppo(spec: Spec) -> dict:

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    try:
        from alignment.ppo import PPOConfig, PPOTrainer
        from policies.value import SequenceCritic
        from reward.model import RewardModel
    except Exception as exc:
        raise Pending(f"our PPO cannot be imported: {type(exc).__name__}: {exc}") from None
    from alignment.ppo.trainer import make_accelerator
    from benchmarks.measure import METER, matmul_parameters, summarise

    set_seed(42)
    policy_dir, reward_dir = spec.assets["policy"], spec.assets["reward"]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    critic = SequenceCritic.from_pretrained(reward_dir, dtype=torch.float32)
    # the reward model where the policy is (None: the GPU when there is one), as the stage puts it
    reward_fn = RewardModel(reward_dir, device=None, batch_size=PPO_SETTINGS["batch_size"], use_chat_template=False)
    settings = {k: v for k, v in PPO_SETTINGS.items()}
    settings.update(_parse_sets(spec.ours_set))
    # the stage's default critic (options.critic: value_head, as in recipes/tiny/ppo_rule.yaml, the pipeline's
    # PPO); --ours-set critic=separate: a second network from the reward model, like the peer's value model
    critic_kind = settings.pop("critic", "value_head")
    if critic_kind == "value_head":
        from policies.value import CausalLMWithValueHead

        policy, critic = CausalLMWithValueHead(policy), None
    elif critic_kind != "separate":
        raise ValueError(f"critic must be 'separate' or 'value_head', got {critic_kind!r}")
    config = PPOConfig(total_steps=spec.steps, logging_steps=max(1, spec.steps), seed=42, **settings)
    mixed = {"fp32": "no", "bf16": "bf16"}[spec.precision]  # the precision the peer runs (Spec.precision)
    trainer = PPOTrainer(config, policy, ref, critic, tokenizer, reward_fn, ppo_prompts(tokenizer),
                         accelerator=make_accelerator(config, mixed))
    METER.begin(trainer.policy, tokenizer.pad_token_id)
    history = trainer.train(spec.steps)
    METER.finish()
    last = history[-1] if history else {}
    timing = {k: sum(h.get(k, 0.0) for h in history) for k in ("time/generation", "time/scoring", "time/training")}
    return summarise(
        METER,
        samples=len(history) * config.batch_size,
        matmul_params=matmul_parameters(policy),
        metric=("objective/score", last.get("objective/score")),
        settings={**settings, "total_steps": spec.steps, "critic": critic_kind, "mixed_precision": mixed},
        extra={"steps": len(history), "time_split": timing},
    )


# ---------------------------------------------------------------------------------------------- entry


def run(spec: Spec) -> dict:
    """Run one side of one stage in this process; returns the run's record (see measure.summarise)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.stage == "ppo":
        if spec.side != "ours":
            raise ValueError("the PPO peer runs in its own venv: benchmarks/ppo_peer.py")
        return run_ours_ppo(spec)
    if spec.stage not in TRL_STAGES:
        raise ValueError(f"unknown stage {spec.stage!r}; stages: {', '.join(STAGES)}")
    return run_ours(spec) if spec.side == "ours" else run_peer(spec)
