"""The one metrics vocabulary of every stage, and the one writer of ``metrics.jsonl``.

Each stage logs what its trainer computes under the trainer's own names (trl's
``kl``, ``rewards/<name>/mean``; our PPO's ``objective/kl`` ...), because users
of those trainers know them.  Those names disagree on units: trl's ``kl`` is
nats per response token, our PPO's ``objective/kl`` nats per sequence.  So every
RL record also carries the shared names of :data:`VOCABULARY`, computed here
from either trainer's keys, with one meaning and one unit everywhere: in
metrics.jsonl, in the trackers (they receive the same records), in the plots and
in each run's metrics.json summary.  docs/metrics.md is the table for readers.

KL identities on one batch of N responses with T_i response tokens each
(k = the per-token estimate the trainer uses):

    kl/per_sequence = (1/N) sum_i sum_t k_it
    kl/per_token    = sum_i sum_t k_it / sum_i T_i  = kl/per_sequence / response/tokens
    response/tokens = (1/N) sum_i T_i
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMPLETIONS_FILE", "METRICS_FILE", "VOCABULARY", "MetricsLog", "Metric", "read_records", "shared_rl_metrics"]

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"  # a few sampled completions per logged step (the dashboard shows them)


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    meaning: str
    ppo: str  # where our PPO loop's record has it (or how it is derived)
    trl: str  # where trl's GRPOTrainer / RLOOTrainer logs have it


VOCABULARY: tuple[Metric, ...] = (
    Metric("kl/per_sequence", "nats per response",
           "KL(policy || reference) of a whole response: the sum of the per-token estimates, mean over responses",
           "objective/kl", "kl x completions/mean_length"),
    Metric("kl/per_token", "nats per token",
           "the same KL divided by the mean response length (sum over all response tokens / their count)",
           "objective/kl / val/response_length", "kl"),
    Metric("response/tokens", "tokens per response",
           "mean response length, counting the end-of-turn token and no padding",
           "val/response_length", "completions/mean_length"),
    Metric("reward/total", "score", "mean combined (weighted) reward of the step's scored responses",
           "objective/score", "reward"),
    Metric("reward/<source>", "score", "mean of one reward source over the responses it scored",
           "reward/<source>", "rewards/<source>/mean"),
    Metric("entropy/per_token", "nats per token", "mean entropy of the sampling distribution over response tokens",
           "objective/entropy", "entropy"),
)

# trl's per-source reward means, e.g. rewards/answer_match/mean (its /std and dropped counts stay as they are)
_TRL_REWARD_PREFIX, _TRL_REWARD_SUFFIX = "rewards/", "/mean"


def shared_rl_metrics(record: dict) -> dict:
    """The :data:`VOCABULARY` keys computable from one logged record of our PPO loop or of trl's GRPO/RLOO.

    Returns only the shared keys (an empty dict for a record with none of the sources, e.g. an eval record);
    the caller merges them into the record.  A KL is absent when the trainer logged none (trl with beta=0).
    """
    shared = {}
    if "objective/kl" in record:  # our PPO loop: KL summed over each response
        tokens = record.get("val/response_length")
        shared["kl/per_sequence"] = record["objective/kl"]
        if tokens is not None:
            shared["response/tokens"] = tokens
            shared["kl/per_token"] = record["objective/kl"] / tokens if tokens else math.nan
        for source, target in (("objective/score", "reward/total"), ("objective/entropy", "entropy/per_token")):
            if source in record:
                shared[target] = record[source]
        return shared
    tokens = record.get("completions/mean_length")
    if tokens is not None:
        shared["response/tokens"] = tokens
    if "kl" in record:  # trl: KL per token, the mean over every completion token of the batch
        shared["kl/per_token"] = record["kl"]
        if tokens is not None:
            shared["kl/per_sequence"] = record["kl"] * tokens
    if "reward" in record and tokens is not None:  # `reward` alone is too common a name (e.g. a reward model log)
        shared["reward/total"] = record["reward"]
    if "entropy" in record and tokens is not None:
        shared["entropy/per_token"] = record["entropy"]
    for key, value in record.items():
        if key.startswith(_TRL_REWARD_PREFIX) and key.endswith(_TRL_REWARD_SUFFIX):
            shared["reward/" + key[len(_TRL_REWARD_PREFIX):-len(_TRL_REWARD_SUFFIX)]] = value
    return shared


class MetricsLog:
    """Appends one JSON record per logged step to ``run_dir/metrics.jsonl``, and hands it to the run's trackers.

    Every writer of metrics.jsonl goes through here, so the file, the trackers and the shared vocabulary never
    disagree: each record gets ``step`` and ``time``, the shared RL keys, and the recipe's secret redaction.
    Only the main process writes (``enabled=False`` elsewhere).
    """

    def __init__(self, run_dir: str | Path, trackers=None, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.trackers = trackers
        self.enabled = enabled

    def write(self, record: dict, step: int | None = None) -> dict:
        """Append `record` (with `step` set when given) and return what was written."""
        from alignment.recipe import redact

        full = {"step": step if step is not None else record.get("step", 0), "time": round(time.time(), 3)}
        full.update({k: v for k, v in record.items() if k not in ("step", "time")})
        full.update(shared_rl_metrics(full))
        full = redact(full)
        if not self.enabled:
            return full
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(full, default=float) + "\n")
        if self.trackers is not None:
            self.trackers.log(full)
        return full

    def write_completions(self, step: int, samples: list[dict]) -> None:
        """Append sampled completions of `step` ({"prompt", "completion", "reward", ...} each) to
        completions.jsonl, secrets redacted."""
        from alignment.recipe import redact

        if not self.enabled or not samples:
            return
        with (self.path.parent / COMPLETIONS_FILE).open("a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps(redact({"step": step, **sample}), default=str) + "\n")

    def trim(self, last_step: int) -> None:
        """Drop records after `last_step` (a resumed run re-logs the steps after its checkpoint)."""
        if not self.enabled:
            return
        for path in (self.path, self.path.parent / COMPLETIONS_FILE):
            if not path.is_file():
                continue
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= last_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def read_records(run_dir_or_file: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a run directory or the file itself); [] when there is none."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: not a JSON record ({exc})") from None
    return records
