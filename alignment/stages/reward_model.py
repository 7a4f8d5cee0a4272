"""Stage `reward_model`: a scalar reward model trained on preference pairs with trl's RewardTrainer.

    align run recipes/tiny/reward_model.yaml

Model: ``model.name_or_path`` loaded as a sequence classifier with one output;
a causal-LM checkpoint gets a new score head (starting from the SFT policy is
InstructGPT's practice, Ouyang et al. 2022, sec. 3.5).  That head starts at random
and small; ``options.head_learning_rate`` trains it faster than the body (its own
optimizer group, same schedule), which the tiny demo needs to learn in its budget.

Loss (trl): ``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))`` (Bradley-Terry),
plus ``train.center_rewards_coefficient * mean((r_chosen + r_rejected)^2)`` when
set (Eisenstein et al. 2023, eq. 2), which keeps raw scores near 0 while training.

Data: ``prompt``/``chosen``/``rejected``, standard or conversational (an implicit
prompt, shared by chosen and rejected, works too).  trl *drops* a pair whose
chosen or rejected sequence is longer than ``train.max_length`` tokens (it does
not truncate): the run counts them in metrics.json (``data[i].dropped``) and
fails when, with the other dropped rows, they exceed ``data.max_dropped_fraction``.

Held-out numbers (``heldout`` in metrics.json) are computed after training with
``reward.model.RewardModel`` on the saved directory, the scorer every later stage
uses, on the pairs of ``data.eval`` (or ``data.eval_fraction``):
preference_accuracy = share of pairs with score(chosen) > score(rejected),
reward_margin = mean(score(chosen) - score(rejected)).

Centring (``options.center``): bias = mean raw score of ``options.center_policy``'s
sampled completions on ``options.center_samples`` training prompts (or of the
chosen answers when no policy is given).  It goes into ``reward_config.json``
in the run directory, which RewardModel reads as its default ``bias``, so that
policy scores about 0 on average; ``reward_bias`` in metrics.json.

The run directory is a reward source as it is: ``reward: [{source: runs/tiny/reward_model}]``.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from alignment import data, shared_prompt
from alignment.checkpoint import save_run, write_json
from alignment.errors import DataError, RecipeError
from alignment.stages import common


@dataclass(frozen=True)
class Options:
    """`options:` of a reward_model recipe."""

    center: bool = False  # measure a bias after training so the centring samples score ~0 (reward_config.json)
    # whose completions define 0: a causal-LM checkpoint (dir or hub id), "model" = model.name_or_path
    # (the SFT policy the RM started from), or null = the chosen answers of the training pairs
    center_policy: Union[str, None] = None
    center_samples: int = 256  # training prompts used to measure the bias
    center_max_new_tokens: int = 32  # length cap of the centring policy's samples
    score_batch_size: int = 64  # batch size of the held-out and centring scoring passes
    # learning rate of the new score head (null: train.learning_rate, like the body); it follows the same
    # warm-up and schedule.  The head starts at random and small, and at the body's rate it learns slowly
    head_learning_rate: Union[float, None] = None
    # auto: chosen and rejected run their shared prompt through the decoder once when the model allows it
    # (alignment/shared_prompt.py: same rewards and gradients, fewer tokens); true: the same or an error; false: off
    share_prompt: Literal["auto", True, False] = "auto"


def trainer_class(share_prompt: bool):
    """trl's RewardTrainer reading the score where scoring reads it (the last real token, also when
    pad == EOS: reward.model.pool_at_last_real_token); with `share_prompt`, its loss pass also packs each
    pair's shared prompt."""
    from trl import RewardTrainer

    from reward.model import pool_at_last_real_token

    class LastTokenRewardTrainer(RewardTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pool_at_last_real_token(self.model)  # after trl's peft wrapping, which replaces the score head

    if not share_prompt:
        return LastTokenRewardTrainer

    class SharedPromptRewardTrainer(LastTokenRewardTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            with shared_prompt.active():
                return super().compute_loss(model, inputs, *args, **kwargs)

    return SharedPromptRewardTrainer


def check_options(recipe) -> None:
    """Settings that cannot work, refused before any model is loaded."""
    options, where = recipe.options, recipe.source_path
    if recipe.eval is not None:
        raise RecipeError(f"{where}: eval: the reward_model stage generates nothing; its held-out pairs come "
                          "from data.eval (or data.eval_fraction). Remove the eval: section")
    if options["center_policy"] is not None and not options["center"]:
        raise RecipeError(f"{where}: options.center_policy is set but options.center is false; set center: true")
    if options["center_policy"] == "model" and recipe.model.name_or_path.startswith("tiny:"):
        raise RecipeError(f"{where}: options.center_policy: model, but model.name_or_path is "
                          f"{recipe.model.name_or_path!r} (a random model, not a policy); name the SFT checkpoint "
                          "or use center_policy: null to centre on the chosen answers")
    for key in ("center_samples", "center_max_new_tokens", "score_batch_size"):
        if options[key] < 1:
            raise RecipeError(f"{where}: options.{key} must be >= 1, got {options[key]}")
    if options["head_learning_rate"] is not None and not options["head_learning_rate"] > 0:
        raise RecipeError(f"{where}: options.head_learning_rate must be > 0 (or null), got {options['head_learning_rate']}")


def reward_model_defaults(recipe, run_dir) -> dict:
    defaults = common.trainer_defaults(recipe, run_dir)
    defaults.update({"max_length": 1024, "disable_dropout": True})
    return defaults


def is_score_head(name: str) -> bool:
    """A parameter of the score head (``score.weight``; under LoRA ``...score.modules_to_save.default.weight``)."""
    return "score" in name.split(".")


def use_head_learning_rate(trainer, head_lr: float) -> None:
    """Give the trainer an optimizer whose score-head parameters train at `head_lr`.

    The trainer's own optimizer (class, betas, weight decay) with the head in a group of its own; the
    trainer keeps it (it only builds one when none is set) and its scheduler scales every group alike.
    """
    model = trainer.model
    decay = set(trainer.get_decay_parameter_names(model))
    groups: dict = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head, weight_decay = is_score_head(name), trainer.args.weight_decay if name in decay else 0.0
        group = groups.setdefault((head, weight_decay), {"params": [], "weight_decay": weight_decay,
                                                         **({"lr": head_lr} if head else {})})
        group["params"].append(param)
    if not any(head for head, _ in groups):
        raise RecipeError("options.head_learning_rate: the model has no trainable score head parameters")
    optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    trainer.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)


def is_conversational_rows(dataset) -> bool:
    """trl decides the format from the first row: messages in chosen means conversational."""
    return isinstance(dataset[0]["chosen"], list)


def count_too_long(report, rows_in: int, rows_out: int, max_length, max_dropped_fraction: float | None) -> dict:
    """The split's load report plus the pairs trl dropped for length (rows_in -> rows_out).

    For the training split (`max_dropped_fraction` given) they count as dropped rows, and more
    dropped rows in all than the fraction allows is a DataError.  The held-out split only
    records the count: RewardModel scores every held-out pair, whatever its length.
    """
    out = dict(vars(report), dropped=dict(report.dropped))
    too_long = rows_in - rows_out
    out["longer_than_max_length"] = too_long
    if max_dropped_fraction is None:
        return out
    if too_long:
        out["dropped"][f"chosen or rejected longer than max_length={max_length} tokens"] = too_long
    out["rows_kept"] = report.rows_kept - too_long
    dropped = out["rows_read"] - out["rows_kept"]
    if rows_out == 0 or dropped / max(out["rows_read"], 1) > max_dropped_fraction:
        raise DataError(f"{report.source}: {dropped} of {out['rows_read']} pairs dropped ({out['dropped']}), "
                        f"more than data.max_dropped_fraction={max_dropped_fraction}; raise train.max_length "
                        "(trl drops, never truncates, a pair longer than it) or fix the data")
    return out


def final_model(trainer, recipe):
    """The trained model as a plain sequence classifier (a LoRA adapter merged in)."""
    model = trainer.model
    if recipe.model.lora is not None and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


def write_scorer(run_dir: Path, model, tokenizer, conversational: bool, bias: float = 0.0, centring=None) -> None:
    """Weights, tokenizer and reward_config.json: enough for RewardModel(run_dir) to score as trained.

    The run is still marked unfinished here (run_info.json comes with save_run, which writes the
    weights again, atomically): scoring the very directory a later stage will load costs one extra write.
    """
    model.save_pretrained(str(run_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(run_dir))
    write_reward_config(run_dir, conversational, bias, centring)


def write_reward_config(run_dir: Path, conversational: bool, bias: float, centring) -> None:
    from reward.model import REWARD_CONFIG

    config = {
        "bias": bias,  # subtracted from every raw score by RewardModel
        "use_chat_template": conversational,  # trained on chat-template text (conversational pairs) or plain text
        "centered_on": centring["on"] if centring else None,
    }
    write_json(run_dir / REWARD_CONFIG, config)


def pair_text(scorer, prompt, completion) -> str:
    """The exact text RewardModel scores for one side of a pair (an implicit prompt is inside `completion`)."""
    if prompt is not None:
        return scorer.text(prompt, completion)
    if isinstance(completion, list) and scorer.use_chat_template:
        return scorer.tokenizer.apply_chat_template(list(completion), tokenize=False)
    return scorer.text("", completion)


def heldout_metrics(run_dir: Path, rows: list[dict], batch_size: int) -> dict:
    """Preference accuracy and margin of the saved reward model on held-out pairs (raw scores, no bias)."""
    from reward.model import RewardModel

    scorer = RewardModel(str(run_dir), batch_size=batch_size, bias=0.0)
    chosen = scorer.score_texts([pair_text(scorer, row.get("prompt"), row["chosen"]) for row in rows])
    rejected = scorer.score_texts([pair_text(scorer, row.get("prompt"), row["rejected"]) for row in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "pairs": len(rows),
        "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
        "ties": sum(m == 0 for m in margins),
        "reward_margin": statistics.fmean(margins),
        "score_chosen_mean": statistics.fmean(chosen),
        "score_rejected_mean": statistics.fmean(rejected),
        "score_std": statistics.pstdev(chosen + rejected),
        "scorer": "reward.model.RewardModel on the saved run directory",
    }


def measure_bias(recipe, run_dir: Path, train_rows) -> dict:
    """Mean raw score of the centring samples: the centring policy's completions, or the chosen answers."""
    from reward.model import RewardModel

    options = recipe.options
    rows = list(train_rows)
    rows = random.Random(recipe.seed).sample(rows, min(options["center_samples"], len(rows)))
    prompts = [row.get("prompt") for row in rows]
    scorer = RewardModel(str(run_dir), batch_size=options["score_batch_size"], bias=0.0)
    policy_spec = options["center_policy"]
    extra = {}
    if policy_spec is None:
        on = f"the chosen answers of {len(rows)} training pairs"
        scores = scorer.score_texts([pair_text(scorer, p, row["chosen"]) for p, row in zip(prompts, rows)])
    else:
        import policies
        from alignment.evaluation.generate import generate_completions

        if any(p is None for p in prompts):
            raise DataError(f"{recipe.data.train}: options.center_policy needs a 'prompt' column to sample from")
        policy_path = recipe.model.name_or_path if policy_spec == "model" else policy_spec
        policy, policy_tokenizer = policies.load(policy_path, seed=recipe.seed,
                                                 trust_remote_code=recipe.model.trust_remote_code)
        samples = generate_completions(policy, policy_tokenizer, prompts, do_sample=True, temperature=1.0,
                                       max_new_tokens=options["center_max_new_tokens"],
                                       batch_size=options["score_batch_size"], seed=recipe.seed)
        del policy
        on = f"{policy_path}: {len(rows)} completions sampled (temperature 1) on training prompts"
        scores = scorer(prompts, [s["text"] for s in samples])
        extra = {"eos_rate": sum(s["ended_with_eos"] for s in samples) / len(samples)}
    return {"on": on, "samples": len(scores), "bias": statistics.fmean(scores),
            "raw_score_std": statistics.pstdev(scores), **extra}


def summary(run_dir: Path, metrics: dict, started: float) -> str:
    line = common.summary_line("reward_model", run_dir, metrics, started)
    heldout = metrics.get("heldout")
    if heldout:
        line += (f" | held-out preference accuracy {heldout['preference_accuracy']:.1%} "
                 f"(margin {heldout['reward_margin']:.2f}, {heldout['pairs']} pairs)")
    if metrics.get("reward_bias") is not None:
        line += f" | reward_bias {metrics['reward_bias']:.3f}"
    too_long = metrics["data"][0].get("longer_than_max_length")
    if too_long:
        line += f" | {too_long} training pairs longer than max_length dropped"
    return line


def trainer_config(recipe, run_dir):
    """trl's RewardConfig this recipe trains with (built by `align validate` too)."""
    from trl import RewardConfig

    return common.build_trainer_config(recipe, RewardConfig, reward_model_defaults(recipe, run_dir))


def run(recipe) -> dict:
    check_options(recipe)
    started, run_dir, resume_from = common.start_run(recipe)
    splits = data.load(recipe.data, "preference", seed=recipe.seed)
    model, tokenizer = common.load_policy(recipe, task="sequence_classification")
    args = trainer_config(recipe, run_dir)
    train_started, cpu_started = time.time(), time.process_time()  # set-up included: tokenizing the pairs
    sharing = shared_prompt.install_for_recipe(recipe, model)
    trainer = trainer_class(sharing)(
        **common.trainer_inputs(recipe, model, tokenizer, args, splits.train, splits.eval, task_type="SEQ_CLS"))
    reports = [count_too_long(splits.reports[0], len(splits.train), len(trainer.train_dataset), args.max_length,
                              recipe.data.max_dropped_fraction)]
    if splits.eval is not None:
        report = splits.reports[-1] if recipe.data.eval else data.LoadReport(
            source=f"{recipe.data.train} (eval_fraction={recipe.data.eval_fraction})",
            rows_read=len(splits.eval), rows_kept=len(splits.eval))
        reports.append(count_too_long(report, len(splits.eval), len(trainer.eval_dataset), args.max_length, None))
    if recipe.options["head_learning_rate"] is not None:
        use_head_learning_rate(trainer, recipe.options["head_learning_rate"])
    common.train(trainer, recipe, run_dir, resume_from)
    train_seconds, train_cpu_seconds = time.time() - train_started, time.process_time() - cpu_started
    model = final_model(trainer, recipe)
    conversational = is_conversational_rows(splits.train)
    write_scorer(run_dir, model, tokenizer, conversational)
    heldout = heldout_metrics(run_dir, splits.eval.to_list(), recipe.options["score_batch_size"]) \
        if splits.eval is not None else None
    centring = measure_bias(recipe, run_dir, splits.train) if recipe.options["center"] else None
    if centring:
        write_reward_config(run_dir, conversational, centring["bias"], centring)
    metrics = {
        "stage": "reward_model",
        "train_loss": common.final_train_loss(trainer),
        "train_steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),  # all threads; steadier than wall time on a busy machine
        "train_accuracy_last": last_logged(trainer, "accuracy"),
        "train_margin_last": last_logged(trainer, "margin"),
        **shared_prompt.outcome(sharing, model),  # and the share of decoder tokens not run
        "heldout": heldout,
        "reward_bias": centring["bias"] if centring else None,
        "centering": centring,
        "data": reports,
    }
    metrics["total_seconds"] = round(time.time() - started, 1)  # load, train, held-out scoring and centring
    save_run(run_dir, model=model, tokenizer=tokenizer, recipe=recipe, run_info=common.run_info(recipe),
             metrics=metrics)
    metrics["summary"] = summary(run_dir, metrics, started)
    return metrics


def last_logged(trainer, key: str):
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return float(values[-1]) if values else None

