"""Shared by the preference stages (dpo, kto, orpo, cpo, simpo): pair data, the reference model, held-out metrics.

Data (every step counted in the run's data report, nothing dropped silently):

1. ``alignment.data.load(..., "preference")`` validates rows and drops empty
   and ``chosen == rejected`` pairs.
2. :func:`extract_prompt` moves an implicit prompt (shared at the start of
   chosen and rejected) into a ``prompt`` column.
3. :func:`count_repeats` counts exact repeats and contradictory pairs (a > b and b > a);
   only with ``options.drop_duplicates: true`` does :func:`drop_duplicates` keep the first of
   identical rows.  Repeated comparisons are data: several annotators (or arena votes) saying
   a > b three times and b > a once is a 75% label, which de-duplication would flatten to 50%.
4. :func:`length_pass` measures every pair as trl will tokenize it (rows that
   provably fit by byte length are not tokenized), counts the rows trl will
   truncate (``max_length``, keep-start), and drops the rows whose prompt
   alone fills ``max_length`` or exceeds ``data.max_prompt_tokens`` (trl would
   filter the first kind without a count).

Reference model (``options.reference``, DPO and KTO):

| value         | what trl gets                                        | needs            |
| ------------- | ---------------------------------------------------- | ---------------- |
| ``copy``      | ``ref_model`` = a frozen deep copy of the policy     | 2x weights       |
| ``adapter``   | no ``ref_model``: base model with the LoRA disabled  | ``model.lora``   |
| ``precomputed``| reference log-probs computed once before training   | one extra pass   |
| ``auto``      | ``adapter`` with LoRA; else ``precomputed`` from 1.5 epochs on, ``copy`` below |  |

Held-out metrics (:class:`Measurements`, :func:`pair_metrics`, :func:`sampled_kl`) are computed
by us on the eval pairs, before and after training, the same way for every
stage: log-probs of chosen and rejected, preference accuracy (policy gives
chosen the higher log-prob), implicit-reward accuracy and margin against the
starting model, and the sampled KL(policy || starting model).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.errors import DataError, RecipeError


@dataclass(frozen=True)
class Options:
    """`options:` of the preference stages that keep a reference model (dpo, kto)."""

    evaluate_before: bool = True  # held-out task metrics of the starting model, for the before/after table
    reference: Literal["auto", "copy", "adapter", "precomputed"] = "auto"  # see the module docstring
    drop_duplicates: bool = False  # true: identical (prompt, chosen, rejected) rows kept once; repeats are votes
    kl_samples: int = 200  # held-out prompts sampled for KL(policy || start) after training; 0 = off
    heldout_batch_size: int = 128  # batch size of the held-out log-prob passes


# ----------------------------------------------------------------------------- data


def is_conversational(value) -> bool:
    return isinstance(value, list)


def _common_message_prefix(chosen: list, rejected: list) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def _common_text_prefix(chosen: str, rejected: str) -> int:
    """Length of the shared start, cut back to the last whitespace the two share.

    A character-level prefix would move the shared first characters of the two
    answers into the prompt ("A: 12" vs "A: 13" -> prompt "A: 1"); cutting back
    over the partial word and the whitespace before it keeps whole words in the
    completions ("A:" + " 12" / " 13"), the usual prompt/completion convention.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1  # a partial word
    while n > 0 and chosen[n - 1].isspace():
        n -= 1  # the separator goes with the completion
    return n


def extract_prompt(row: dict) -> dict:
    """A row with the shared start of chosen/rejected moved into ``prompt`` (rows with a prompt are unchanged).

    Conversational: the leading messages both share.  Standard: the shared text
    up to the last whitespace both share (see :func:`_common_text_prefix`).  A pair with nothing shared is an error.
    """
    if row.get("prompt") is not None:
        return row
    chosen, rejected = row["chosen"], row["rejected"]
    if is_conversational(chosen) != is_conversational(rejected):
        raise DataError("chosen and rejected must both be strings or both be message lists")
    n = _common_message_prefix(chosen, rejected) if is_conversational(chosen) else _common_text_prefix(chosen, rejected)
    if n == 0:
        raise DataError(
            "a row has no 'prompt' and chosen/rejected share no start to extract it from; add a 'prompt' column"
        )
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _row_key(row: dict, columns) -> str:
    return json.dumps([row.get(c) for c in columns], sort_keys=True, ensure_ascii=False)


def _reversed_key(row: dict, columns) -> str:
    """The key of the opposite judgement: chosen and rejected swapped (paired), or the label flipped (unpaired)."""
    prompt, first, second = columns
    if second == "label":
        return _row_key({prompt: row.get(prompt), first: row.get(first), second: not row.get(second)}, columns)
    return _row_key({prompt: row.get(prompt), first: row.get(second), second: row.get(first)}, columns)


def count_repeats(rows: list[dict], columns=("prompt", "chosen", "rejected")) -> dict:
    """{"exact repeats": rows equal to an earlier row, "contradictory rows": rows whose opposite judgement
    (b > a for a > b; the other label for KTO) is also in the data}."""
    from collections import Counter

    seen = Counter(_row_key(row, columns) for row in rows)
    contradictory = sum(1 for row in rows if _reversed_key(row, columns) in seen)
    return {"exact repeats": len(rows) - len(seen), "contradictory rows": contradictory}


def drop_duplicates(rows: list[dict], counts: dict, columns=("prompt", "chosen", "rejected")) -> list[dict]:
    """The rows with repeats of the same (prompt, chosen, rejected) removed; counts["duplicate pair"] += removed."""
    seen, kept = set(), []
    for row in rows:
        key = _row_key(row, columns)
        if key in seen:
            counts["duplicate pair"] = counts.get("duplicate pair", 0) + 1
            continue
        seen.add(key)
        kept.append(row)
    return kept


def unpair(rows: list[dict]) -> list[dict]:
    """Paired rows -> unpaired rows for KTO: chosen -> label true, rejected -> label false (other columns kept)."""
    out = []
    for row in rows:
        rest = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
        out.append({**rest, "completion": row["chosen"], "label": True})
        out.append({**rest, "completion": row["rejected"], "label": False})
    return out


# ----------------------------------------------------------------------------- tokenization (as trl does it)


def _chat_ids(tokenizer, messages: list, add_generation_prompt: bool = False) -> list[int]:
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                             add_generation_prompt=add_generation_prompt)
    return list(rendered["input_ids"])


def completion_ids(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one prompt/completion, tokenized the way trl's preference trainers do.

    Conversational: chat template of the prompt (with the generation prompt) and of
    prompt + completion, split where they diverge (the end-of-turn token is in the
    completion).  Standard: the tokenizer on the prompt and on prompt + completion + EOS.
    """
    if is_conversational(prompt) or is_conversational(completion):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full = _chat_ids(tokenizer, list(prompt) + list(completion))
    else:
        eos = tokenizer.eos_token or ""
        text = completion if completion.endswith(eos) else completion + eos
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        full = list(tokenizer(prompt + text)["input_ids"])
    n = 0
    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
        n += 1
    return prompt_ids[:n], full[n:]


@dataclass
class TokenizedPair:
    prompt: list
    chosen: list
    rejected: list


def tokenize_pairs(tokenizer, rows: list[dict]) -> list[TokenizedPair]:
    out = []
    for row in rows:
        prompt_ids, chosen = completion_ids(tokenizer, row["prompt"], row["chosen"])
        prompt_rejected, rejected = completion_ids(tokenizer, row["prompt"], row["rejected"])
        n = min(len(prompt_ids), len(prompt_rejected))
        out.append(TokenizedPair(prompt_ids[:n], prompt_ids[n:] + chosen, prompt_rejected[n:] + rejected))
    return out


# Tokens a tokenizer may add that cover no text (BOS/EOS, a SentencePiece dummy-prefix piece).
_UNCOVERED_TOKENS = 8


def _byte_bound(tokenizer, prompt, completion) -> tuple[int, int]:
    """Upper bounds on the token counts of (prompt, prompt + completion), without tokenizing.

    Byte-level BPE and SentencePiece tokens each cover at least one byte of the
    rendered text, so bytes + a few added special tokens bound the token count.
    """
    if is_conversational(prompt) or is_conversational(completion):
        prompt_text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    else:
        prompt_text, full_text = prompt, prompt + completion + (tokenizer.eos_token or "")
    return len(prompt_text.encode()) + _UNCOVERED_TOKENS, len(full_text.encode()) + _UNCOVERED_TOKENS


def _lengths(tokenizer, prompt, completion, max_length, max_prompt_tokens) -> tuple[int, int]:
    """(prompt tokens, prompt + completion tokens); byte bounds when they already prove the row fits."""
    prompt_bound, full_bound = _byte_bound(tokenizer, prompt, completion)
    if (max_length is None or full_bound <= max_length) and (max_prompt_tokens is None
                                                              or prompt_bound <= max_prompt_tokens):
        return prompt_bound, full_bound
    prompt_ids, ids = completion_ids(tokenizer, prompt, completion)
    return len(prompt_ids), len(prompt_ids) + len(ids)


def length_pass(tokenizer, rows: list[dict], counts: dict, max_length: int | None, max_prompt_tokens: int | None,
                completion_columns=("chosen", "rejected")) -> list[dict]:
    """Drop rows whose prompt cannot fit and count the rows trl will truncate (keep-start, to max_length).

    counts["dropped"][reason] += 1 for a dropped row; counts["truncated"] += 1 for a row
    whose longer completion trl's collator will cut at max_length.
    """
    dropped = counts.setdefault("dropped", {})
    if max_length is None and max_prompt_tokens is None:
        return rows
    kept = []
    for row in rows:
        lengths = [_lengths(tokenizer, row["prompt"], row[c], max_length, max_prompt_tokens) for c in completion_columns]
        prompt_len = min(length[0] for length in lengths)
        full_len = max(length[1] for length in lengths)
        if max_prompt_tokens is not None and prompt_len > max_prompt_tokens:
            reason = "prompt longer than data.max_prompt_tokens"
        elif max_length is not None and prompt_len >= max_length:
            reason = "prompt fills max_length"
        else:
            reason = None
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        if max_length is not None and full_len > max_length:
            counts["truncated"] = counts.get("truncated", 0) + 1
        kept.append(row)
    return kept


def check_length_losses(source, counts: dict, rows: int, max_length, limit: float) -> None:
    """Rows dropped or cut for length, over the rows that reached the length pass, must stay within `limit`.

    Duplicates are not counted: dropping them loses no information. A cut pair is counted, because
    cutting the end of an answer can remove exactly what makes it the preferred one.
    """
    dropped = sum(n for reason, n in counts.get("dropped", {}).items() if "max_" in reason)
    lost = dropped + counts.get("truncated", 0)
    if rows and lost / rows > limit:
        raise DataError(
            f"{source}: {lost} of {rows} rows are too long ({dropped} dropped: the prompt alone fills max_length or "
            f"exceeds data.max_prompt_tokens; {counts.get('truncated', 0)} cut at max_length={max_length}), more "
            f"than data.max_dropped_fraction={limit}; raise train.max_length or data.max_prompt_tokens, shorten "
            "the data, or raise the limit")


@dataclass
class PairData:
    """Training (and held-out) rows ready for a trl trainer, with what preparing them counted."""

    train: object  # datasets.Dataset
    eval: object | None
    eval_rows: list | None  # held-out pairs (paired format) for pair_metrics, or None
    reports: list = field(default_factory=list)


def _split_report(load_report, rows_kept: int, extra: dict) -> dict:
    """The loader's report with our drops added: rows read, rows kept, dropped by reason, truncated."""
    report = dict(vars(load_report))
    report["dropped"] = dict(report["dropped"], **extra["dropped"])
    report["truncated_to_max_length"] = extra.get("truncated", 0)
    report["repeats"] = extra.get("repeats", {})
    if "pairs_kept" in extra:
        report["rows_kept"] = extra["pairs_kept"]
        report["unpaired_rows"] = rows_kept
    else:
        report["rows_kept"] = rows_kept
    return report


def prepare_pairs(recipe, tokenizer, max_length: int | None, *, fmt: str = "preference",
                  unpair_rows: bool = False, seed: int = 42) -> PairData:
    """Load, validate, extract prompts, de-duplicate, length-check (and for KTO unpair) the recipe's data."""
    import datasets

    from alignment import data

    options = recipe.options
    splits = data.load(recipe.data, fmt, seed=recipe.seed)
    train_report, eval_report = splits.reports[0], splits.reports[1] if len(splits.reports) > 1 else None
    if splits.eval is not None and eval_report is None:  # held out from the training file by data.eval_fraction
        eval_report = data.LoadReport(source=f"{recipe.data.train} (eval_fraction={recipe.data.eval_fraction})",
                                      rows_read=len(splits.eval), rows_kept=len(splits.eval))
        train_report = data.LoadReport(**{**vars(train_report), "dropped": dict(train_report.dropped)})
        train_report.dropped["held out by data.eval_fraction"] = len(splits.eval)
    prepared, reports, eval_rows = [], [], None
    for name, dataset, load_report in (("train", splits.train, train_report), ("eval", splits.eval, eval_report)):
        if dataset is None:
            prepared.append(None)
            continue
        rows = dataset.to_list()
        extra = {"dropped": {}}
        if fmt == "preference":
            rows = [extract_prompt(row) for row in rows]
            extra["repeats"] = count_repeats(rows)
            if options.get("drop_duplicates", False):
                rows = drop_duplicates(rows, extra["dropped"])
            rows_before_length_pass = len(rows)
            rows = length_pass(tokenizer, rows, extra, max_length, recipe.data.max_prompt_tokens)
            if name == "eval":
                eval_rows = rows
            if unpair_rows:
                extra["pairs_kept"] = len(rows)
                rows = unpair(rows)
                # chosen and rejected of one prompt must not sit side by side: KTO's KL term pairs each
                # completion with its neighbour's prompt, which must be a different prompt
                import random

                random.Random(seed).shuffle(rows)
        else:  # unpaired (KTO)
            extra["repeats"] = count_repeats(rows, columns=("prompt", "completion", "label"))
            if options.get("drop_duplicates", False):
                rows = drop_duplicates(rows, extra["dropped"], columns=("prompt", "completion", "label"))
            rows_before_length_pass = len(rows)
            rows = length_pass(tokenizer, rows, extra, max_length, recipe.data.max_prompt_tokens,
                               completion_columns=("completion",))
        if not rows:
            raise DataError(f"{load_report.source}: no rows left after preparing the {name} split ({extra})")
        if name == "train":
            check_length_losses(load_report.source, extra, rows_before_length_pass, max_length,
                                recipe.data.max_dropped_fraction)
        reports.append(_split_report(load_report, len(rows), extra))
        prepared.append(datasets.Dataset.from_list(rows))
    return PairData(train=prepared[0], eval=prepared[1], eval_rows=eval_rows, reports=reports)


# ----------------------------------------------------------------------------- reference model


# Measured on the tiny demo, 1 thread (docs/preference.md): at 1.1 epochs a frozen copy and precomputing cost the
# same (33.9 vs 33.7 CPU-s); at 3.4 epochs precomputing costs 18% less (81.5 vs 98.9 CPU-s).  Precomputing does one
# reference forward per training row up front, a copy one per row *seen*: precompute once a run sees each row more
# than about once, with a margin for its set-up (dataset cache writes).
PRECOMPUTE_BREAK_EVEN_EPOCHS = 1.5


def check_reference(recipe) -> None:
    """Errors in the reference choice, raised before any model is loaded."""
    if "precompute_ref_log_probs" in recipe.train:
        raise RecipeError(f"{recipe.source_path}: train.precompute_ref_log_probs: set options.reference: precomputed "
                          "instead (one key chooses the reference model)")
    if recipe.options["reference"] == "adapter" and recipe.model.lora is None:
        raise RecipeError(f"{recipe.source_path}: options.reference: adapter needs model.lora (the reference is the "
                          "base model with the adapter disabled); use copy or precomputed for full fine-tuning")


def planned_epochs(args, train_rows: int) -> float:
    """How many times the run will go over the training rows (max_steps wins over num_train_epochs, as in trl)."""
    if args.max_steps and args.max_steps > 0:
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        return args.max_steps * per_step / max(train_rows, 1)
    return float(args.num_train_epochs)


def choose_reference(recipe, args, train_rows: int) -> str:
    """The reference mode of a run: the recipe's, or for `auto` the cheapest correct one.

    auto: `adapter` with LoRA (no second model, same compute as a copy); for full fine-tuning
    `precomputed` when the run covers the data more than PRECOMPUTE_BREAK_EVEN_EPOCHS times, else `copy`.
    """
    check_reference(recipe)
    mode = recipe.options["reference"]
    if mode != "auto":
        return mode
    if recipe.model.lora is not None:
        return "adapter"
    return "precomputed" if planned_epochs(args, train_rows) >= PRECOMPUTE_BREAK_EVEN_EPOCHS else "copy"


def frozen_copy(model):
    reference = copy.deepcopy(model)
    reference.eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


def reference_setup(mode: str, model, args) -> dict:
    """Trainer kwargs that give trl the chosen reference; sets `args.precompute_ref_log_probs` to match.

    copy: an explicit frozen copy (trl's own would reload the model from its saved path, which an
    in-memory `tiny:` model does not have); adapter: nothing, trl disables the LoRA adapter;
    precomputed: trl computes the log-probs with the untrained policy before the first step.
    """
    args.precompute_ref_log_probs = mode == "precomputed"
    return {"ref_model": frozen_copy(model)} if mode == "copy" else {}


class reference_model:
    """Context manager giving the starting (reference) model after training, whatever the reference mode.

    A kept copy is used as is; with LoRA the adapter is disabled; otherwise (precomputed)
    the starting model is loaded again from the recipe, and freed on exit.
    """

    def __init__(self, trainer, recipe):
        self.trainer, self.recipe, self._adapter = trainer, recipe, None

    def __enter__(self):
        ref = getattr(self.trainer, "ref_model", None)
        if ref is not None:
            return self.trainer.accelerator.unwrap_model(ref)
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if hasattr(model, "disable_adapter"):
            self._adapter = model.disable_adapter()
            self._adapter.__enter__()
            return model
        from alignment.stages import common

        reference, _ = common.load_policy(self.recipe)
        return reference

    def __exit__(self, *exc):
        if self._adapter is not None:
            self._adapter.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------- held-out metrics


def completion_logps(model, pad_id: int, items: list[tuple[list, list]], batch_size: int = 128) -> list[float]:
    """Summed log-probability of each completion (ids) after its prompt (ids), in eval mode, without gradients.

        log p(y | x) = sum_t log softmax(logits_{|x| + t - 1})[y_t]
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                width = max(len(p) + len(c) for p, c in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (p, c) in enumerate(batch):
                    ids[i, :len(p) + len(c)] = torch.tensor(p + c)
                    mask[i, :len(p) + len(c)] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                for i, (p, c) in enumerate(batch):
                    out.append(float(token_logps[i, len(p) - 1:len(p) - 1 + len(c)].sum()))
    finally:
        model.train(was_training)
    return out


def pair_logps(model, tokenizer, pairs: list[TokenizedPair], batch_size: int = 128) -> tuple[list, list]:
    """(chosen log-probs, rejected log-probs) of tokenized held-out pairs under `model`."""
    items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    logps = completion_logps(model, tokenizer.pad_token_id, items, batch_size)
    return logps[:len(pairs)], logps[len(pairs):]


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def pair_metrics(chosen: list, rejected: list, start: tuple | None = None, beta: float | None = None) -> dict:
    """Held-out preference numbers of one model; with `start` (the starting model's log-probs), drift and rewards.

    * preference_accuracy = mean[ log pi(y_c|x) > log pi(y_r|x) ]   (the policy itself ranks the pair right)
    * drift_chosen / drift_rejected = mean[ log pi(y|x) - log pi_start(y|x) ]
    * reward_accuracy = mean[ r_c > r_r ], reward_margin = mean[ r_c - r_r ],
      with DPO's implicit reward r = beta * (log pi(y|x) - log pi_start(y|x))
    """
    n = len(chosen)
    metrics = {
        "pairs": n,
        "preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "logps_chosen": _mean(chosen),
        "logps_rejected": _mean(rejected),
    }
    if start is not None:
        start_chosen, start_rejected = start
        d_chosen = [c - s for c, s in zip(chosen, start_chosen)]
        d_rejected = [r - s for r, s in zip(rejected, start_rejected)]
        scale = 1.0 if beta is None else beta
        metrics.update({
            "drift_chosen": _mean(d_chosen),
            "drift_rejected": _mean(d_rejected),
            "drift_abs": _mean([abs(d) for d in d_chosen + d_rejected]),
            "reward_accuracy": sum(c > r for c, r in zip(d_chosen, d_rejected)) / n,
            "reward_margin": _mean([scale * (c - r) for c, r in zip(d_chosen, d_rejected)]),
        })
    return metrics


def sampled_kl(policy, reference, tokenizer, prompts: list, max_new_tokens: int, seed: int = 0,
               batch_size: int = 128) -> dict | None:
    """KL(policy || reference) on held-out prompts, from completions sampled from the policy (k1 and k3 estimators).

    `reference` is a context manager yielding the reference model; it is entered only after
    the policy has been sampled and scored, since with LoRA it switches the policy's adapter off.
    """
    if not prompts:
        return None
    from alignment.evaluation.generate import generate_completions, sequence_logprobs
    from alignment.evaluation.stats import kl_monte_carlo

    samples = generate_completions(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   do_sample=True, temperature=1.0, seed=seed)
    kept = [(prompt, s["token_ids"]) for prompt, s in zip(prompts, samples) if s["token_ids"]]
    if not kept:
        return None
    prompts, ids = [p for p, _ in kept], [i for _, i in kept]
    policy_logps = sequence_logprobs(policy, tokenizer, prompts, ids, batch_size=batch_size, per_token=True)
    with reference as reference_model:
        reference_logps = sequence_logprobs(reference_model, tokenizer, prompts, ids, batch_size=batch_size,
                                            per_token=True)
    return kl_monte_carlo(policy_logps, reference_logps)


class HeldOut:
    """The held-out pairs of a run, scored under the starting model and again after training."""

    def __init__(self, tokenizer, rows: list | None, batch_size: int = 128):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.rows = list(rows or [])
        self.pairs = tokenize_pairs(tokenizer, self.rows) if self.rows else []
        self.start = None

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def score_start(self, model) -> dict | None:
        if not self:
            return None
        self.start = pair_logps(model, self.tokenizer, self.pairs, self.batch_size)
        return pair_metrics(*self.start)

    def score(self, model, beta: float | None = None) -> dict | None:
        if not self:
            return None
        chosen, rejected = pair_logps(model, self.tokenizer, self.pairs, self.batch_size)
        return pair_metrics(chosen, rejected, start=self.start, beta=beta)

    def prompts(self, limit: int) -> list:
        """Up to `limit` distinct held-out prompts, in file order."""
        seen, prompts = set(), []
        for row in self.rows:
            key = json.dumps(row["prompt"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(row["prompt"])
        return prompts[:limit]


class Measurements:
    """Every number a preference stage reports, taken the same way for each stage.

    ``before(model)``: held-out task metrics (``common.evaluate_policy``) and the
    held-out pairs under the starting model.  ``after(trainer)``: the same again,
    plus drift, implicit rewards and the sampled KL to the starting model.
    Both also go to metrics.jsonl (as ``heldout/...`` records).
    """

    def __init__(self, recipe, tokenizer, pairs: PairData, metrics_log):
        self.recipe, self.tokenizer, self.metrics_log = recipe, tokenizer, metrics_log
        self.heldout = HeldOut(tokenizer, pairs.eval_rows, recipe.options["heldout_batch_size"])
        self.task_before = self.heldout_before = None

    def before(self, model) -> None:
        from alignment.stages import common

        if self.recipe.options["evaluate_before"]:
            self.task_before = common.evaluate_policy(model, self.tokenizer, self.recipe.eval)
        self.heldout_before = self.heldout.score_start(model)
        log_record(self.metrics_log, 0, self.heldout_before, "heldout")

    def after(self, trainer, beta: float | None = None) -> dict:
        from alignment.stages import common

        policy = trainer.accelerator.unwrap_model(trainer.model)
        heldout_after = self.heldout.score(policy, beta=beta)
        log_record(self.metrics_log, trainer.state.global_step, heldout_after, "heldout")
        kl = None
        if self.heldout and self.recipe.options["kl_samples"]:
            max_new_tokens = self.recipe.eval.max_new_tokens if self.recipe.eval else 16
            kl = sampled_kl(policy, reference_model(trainer, self.recipe), self.tokenizer,
                            self.heldout.prompts(self.recipe.options["kl_samples"]),
                            max_new_tokens=max_new_tokens, seed=self.recipe.seed)
            log_record(self.metrics_log, trainer.state.global_step, kl, "kl_to_start")
        return {
            "train_margin_first_last": logged_series(trainer, "rewards/margins"),
            "train_accuracy_first_last": logged_series(trainer, "rewards/accuracies"),
            "heldout_before": self.heldout_before,
            "heldout_after": heldout_after,
            "kl_to_start": kl,
            "before": self.task_before,
            "after": common.evaluate_policy(policy, self.tokenizer, self.recipe.eval),
        }


def log_record(metrics_log, step: int, record: dict, prefix: str) -> None:
    """Append one flat record (prefix/key: value) to the run's metrics.jsonl and trackers, next to the trainer's
    logs."""
    if not record:
        return
    flat = {f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
    metrics_log.write(flat, step=step)


def logged_series(trainer, key: str) -> tuple[float | None, float | None]:
    """First and last value of a key the trainer logged (e.g. "rewards/margins")."""
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return (values[0], values[-1]) if values else (None, None)



# ----------------------------------------------------------------------------- the steps every preference run takes


@dataclass
class PreferenceRun:
    """What a preference stage has built when its trainer is about to be made (see :func:`start`)."""

    recipe: object
    run_dir: Path
    resume_from: str | None
    tokenizer: object
    args: object  # the trl config
    pairs: PairData
    model: object
    measure: Measurements
    metrics_log: object  # alignment.metrics.MetricsLog, open from start() to finish()
    started: float  # the stage's start (wall clock)
    train_started: float = 0.0  # after the "before" measurements: set-up included (tokenizing, precompute)
    cpu_started: float = 0.0

    def trainer_inputs(self) -> dict:
        """The keyword arguments every trl preference trainer takes, from this run."""
        from alignment.stages import common

        evaluation = self.pairs.eval if self.args.eval_strategy != "no" else None
        return common.trainer_inputs(self.recipe, self.model, self.tokenizer, self.args, self.pairs.train, evaluation)


def start(recipe, trainer_config, *, needs_reference: bool = True, **pair_options) -> PreferenceRun:
    """Seed, run directory, tokenizer, trainer config, the validated pairs, the policy, the "before" numbers.

    The data is read and checked before the model loads, so a bad row fails in seconds.  `trainer_config`
    is the stage's (recipe, run_dir) -> trl config; `pair_options` go to prepare_pairs.
    """
    import time

    from alignment.stages import common

    if needs_reference:
        check_reference(recipe)
    started, run_dir, resume_from = common.start_run(recipe)
    tokenizer = common.load_tokenizer(recipe)
    args = trainer_config(recipe, run_dir)
    pairs = prepare_pairs(recipe, tokenizer, args.max_length, **pair_options)
    model, tokenizer = common.load_policy(recipe)
    metrics_log = common.open_metrics_log(recipe, run_dir)  # the held-out records before and after go there too
    measure = Measurements(recipe, tokenizer, pairs, metrics_log)
    measure.before(model)
    run = PreferenceRun(recipe, run_dir, resume_from, tokenizer, args, pairs, model, measure, metrics_log, started)
    run.train_started, run.cpu_started = time.time(), time.process_time()
    return run


def train(run: PreferenceRun, trainer) -> dict:
    """Train with the shared guards; the loss, steps and seconds (wall and CPU) for metrics.json."""
    import time

    from alignment.stages import common

    try:
        common.train(trainer, run.recipe, run.run_dir, run.resume_from, metrics_log=run.metrics_log)
    except BaseException:
        run.metrics_log.close()
        raise
    return {"train_loss": common.final_train_loss(trainer), "train_steps": trainer.state.global_step,
            "train_seconds": round(time.time() - run.train_started, 1),
            # all threads; steadier than wall time on a busy machine
            "train_cpu_seconds": round(time.process_time() - run.cpu_started, 1)}


def finish(run: PreferenceRun, trainer, metrics: dict) -> dict:
    """Save the trained model and metrics.json as a finished run; the metrics with their summary line."""
    import time

    from alignment.stages import common

    metrics["total_seconds"] = round(time.time() - run.started, 1)
    run.metrics_log.close()  # after the measurements: their records reach the trackers too
    return common.finish_run(run.recipe, run.run_dir, trainer.model, run.tokenizer, metrics, run.started)
