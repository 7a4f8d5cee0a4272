"""Online DPO on our RL loop: fresh samples from the current policy, ranked by a reward, DPO loss each step.

One :meth:`OnlineDPOTrainer.step` (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback", arXiv 2402.04792, algorithm 1):

1. take ``batch_size / num_generations`` prompts and sample ``num_generations`` (k >= 2) responses of
   each from the current policy (the rollout of :class:`alignment.ppo.trainer.PPOTrainer`, with the
   reference log-probs it already computes);
2. score them with any reward source (rule, Python function, reward model, judge URL);
3. per prompt, the best-scored response is ``chosen`` and the worst ``rejected`` (a prompt whose
   responses all tie, or with fewer than 2 scored, gives no pair: counted as ``dpo/tied_prompts``);
4. ``ppo_epochs`` optimizer updates, each over all the step's pairs, of the DPO-family loss
   (:data:`DPO_LOSSES`) against the frozen reference, plus ``sft_weight`` x the chosen response's
   mean token negative log-likelihood (Pang et al. 2024, arXiv 2404.19733, eq. 1; trl's ``sft`` loss).

Sequence log-probs are sums over response tokens at ``temperature`` (the sampling temperature, so the
policy being trained is the one that sampled; 1.0 is the plain model).

References
----------
[DPO]  Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, eq. 7.
[IPO]  Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
       Preferences", arXiv 2310.12036, eq. 17.
[SLiC] Zhao et al. 2023, "SLiC-HF", arXiv 2305.10425, eq. 2 (the hinge form, with the reference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignment.ppo.config import PPOConfig, SettingError
from alignment.ppo.losses import logprobs_from_logits, masked_sum
from alignment.ppo.trainer import PPOTrainer

__all__ = ["DPO_LOSSES", "OnlineDPOConfig", "OnlineDPOTrainer", "best_worst_pairs", "dpo_loss", "register_dpo_loss"]

DPO_LOSSES: dict[str, Callable] = {}


def register_dpo_loss(name: str):
    """``@register_dpo_loss("name")``: ``fn(margin, beta) -> per-pair loss``, margin h as in :func:`dpo_loss`."""

    def decorate(fn):
        if name in DPO_LOSSES:
            raise ValueError(f"DPO loss {name!r} is already registered")
        DPO_LOSSES[name] = fn
        return fn

    return decorate


@register_dpo_loss("sigmoid")
def sigmoid_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO [DPO eq. 7]: ``-log sigmoid(beta h)``."""
    return -F.logsigmoid(beta * margin)


@register_dpo_loss("ipo")
def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO [IPO eq. 17]: ``(h - 1 / (2 beta))^2`` (beta plays IPO's tau)."""
    return (margin - 1.0 / (2.0 * beta)) ** 2


@register_dpo_loss("hinge")
def hinge_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC's hinge with the reference [SLiC eq. 2]: ``max(0, 1 - beta h)``."""
    return torch.relu(1.0 - beta * margin)


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             sft_weight: float = 0.0, chosen_length=None):
    """Per-pair loss of ``loss_type`` and the margin
    ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` (sequence log-probs);
    with ``sft_weight`` w the loss gains ``w * (-log pi(y_w) / |y_w|)``, the chosen response's mean token NLL."""
    if loss_type not in DPO_LOSSES:
        raise KeyError(f"unknown loss_type {loss_type!r}; valid: {', '.join(sorted(DPO_LOSSES))}")
    margin = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    loss = DPO_LOSSES[loss_type](margin, beta)
    if sft_weight:
        loss = loss + sft_weight * (-logp_chosen / chosen_length.clamp(min=1))
    return loss, margin


def best_worst_pairs(scores: torch.Tensor, keep: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(chosen, rejected)``: in each group of ``group_size`` consecutive rows, the kept row with
    the highest score (the first of equals) and the one with the lowest (the last of equals); a group with
    fewer than two kept rows, or whose kept scores all tie, gives no pair."""
    chosen, rejected = [], []
    for start in range(0, scores.shape[0], group_size):
        rows = [start + j for j in range(group_size) if bool(keep[start + j])]
        if len(rows) < 2:
            continue
        values = [float(scores[r]) for r in rows]
        best, worst = max(values), min(values)
        if best == worst:
            continue
        chosen.append(rows[values.index(best)])
        rejected.append(rows[len(values) - 1 - values[::-1].index(worst)])
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


# PPO settings online DPO has no use for: a recipe that sets one is told so instead of silently ignored.
_UNUSED = ("critic_learning_rate", "kl_coef", "adaptive_kl", "target_kl", "horizon", "kl_estimator", "whiten_rewards",
           "advantage_estimator", "policy_loss", "kl_in", "loss_aggregation", "dual_clip", "gamma", "lam",
           "cliprange", "cliprange_value", "vf_coef", "gradient_accumulation_steps")


@dataclass
class OnlineDPOConfig(PPOConfig):
    """:class:`PPOConfig` for online DPO: ``batch_size`` samples per step (``batch_size / num_generations``
    prompts), one optimizer update per ``ppo_epochs`` pass over the step's pairs, ``mini_batch_size``
    pairs per forward pass (memory only)."""

    beta: float = 0.1  # DPO's beta: the strength of the implicit KL to the reference
    loss_type: str = "sigmoid"  # sigmoid (DPO), ipo, hinge
    # + sft_weight x the chosen response's mean token NLL (as trl's loss_type [sigmoid, sft]): plain DPO can
    # lower the chosen response's likelihood too, only less than the rejected one's
    sft_weight: float = 0.0
    num_generations: int = 2  # responses sampled per prompt; the best and the worst form its pair
    ppo_epochs: int = 1  # updates per step over the same pairs (1: each judgement used once, as in the paper)
    mini_batch_size: int = 16  # pairs per forward pass; the update covers all the step's pairs
    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
        for key in _UNUSED:
            if getattr(self, key) != defaults[key]:
                raise SettingError(key, f"OnlineDPOConfig.{key} is a PPO setting online DPO does not use; remove it "
                                   "(the KL to the reference is DPO's beta)")
        self._check_positive("beta")
        self._check_non_negative("sft_weight")
        self._check_choice("loss_type", tuple(sorted(DPO_LOSSES)))
        if self.num_generations < 2:
            raise SettingError("num_generations", "OnlineDPOConfig.num_generations must be >= 2: a pair needs two "
                               f"responses of one prompt (got {self.num_generations})")

    @property
    def needs_critic(self) -> bool:
        return False

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs


class OnlineDPOTrainer(PPOTrainer):
    """Online DPO on :class:`PPOTrainer`'s rollout, scoring, metrics, health checks, checkpoints and resume.

    Args as :class:`PPOTrainer` without the critic: ``(config, policy, ref_policy, tokenizer, reward_fn,
    prompts)``; ``ref_policy=None`` with a peft policy means the adapter disabled.
    """

    def __init__(self, config, policy, ref_policy, tokenizer, reward_fn, prompts, accelerator=None):
        if not isinstance(config, OnlineDPOConfig):
            raise TypeError(f"config must be an OnlineDPOConfig, got {type(config).__name__}")
        super().__init__(config, policy, ref_policy, None, tokenizer, reward_fn, prompts, accelerator)

    def _prepare_batch(self, rollout, scores, keep):
        """The step's (chosen, rejected) pairs and the reference's sequence log-probs."""
        chosen, rejected = best_worst_pairs(scores.cpu(), keep.cpu(), self.config.num_generations)
        device = self.accelerator.device
        data = {
            "query_ids": rollout.query_ids,
            "query_mask": rollout.query_mask,
            "response_ids": rollout.response_ids,
            "response_mask": rollout.response_mask,
            "ref_sequence_logp": masked_sum(rollout.ref_logprobs, rollout.response_mask, dim=-1),
            "chosen": chosen.to(device),
            "rejected": rejected.to(device),
            "scores": scores,
        }
        zeros = torch.zeros(rollout.response_mask.shape[0], device=device)
        return data, {"non_score": zeros, "beta": self.config.beta}

    def _update(self, data: dict) -> dict:
        """``ppo_epochs`` optimizer updates, each the mean DPO loss over all of the step's pairs."""
        cfg = self.config
        pairs = int(data["chosen"].shape[0])
        groups = cfg.batch_size // cfg.num_generations
        stats = {"dpo/pairs": float(pairs), "dpo/tied_prompts": float(groups - pairs)}
        if pairs == 0:
            return stats
        self.minibatch_stats = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(pairs, generator=self.generator).to(self.accelerator.device)
            totals = {"dpo/loss": 0.0, "dpo/margin": 0.0, "dpo/accuracy": 0.0}
            for part in order.split(cfg.mini_batch_size):
                losses, margin = self._pair_loss(data, data["chosen"][part], data["rejected"][part])
                loss = losses.sum() / pairs  # this part's share of the update's mean over all its pairs
                self._poisoned |= not self._all_finite(loss)
                self.accelerator.backward(torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)))
                totals["dpo/loss"] += loss.item()
                totals["dpo/margin"] += margin.detach().sum().item() / pairs
                totals["dpo/accuracy"] += (margin.detach() > 0).float().sum().item() / pairs
            totals.update(self._optimizer_step())
            self.minibatch_stats.append(totals)
        stats.update({k: sum(s[k] for s in self.minibatch_stats if k in s) / len(self.minibatch_stats)
                      for k in {k for s in self.minibatch_stats for k in s}})
        stats["dpo/chosen_score"] = data["scores"][data["chosen"]].float().mean().item()
        stats["dpo/rejected_score"] = data["scores"][data["rejected"]].float().mean().item()
        return stats

    def _pair_loss(self, data: dict, chosen: torch.Tensor, rejected: torch.Tensor):
        """Per-pair loss and margin of chosen rows ``chosen`` vs rejected rows ``rejected`` (one forward pass)."""
        rows = torch.cat([chosen, rejected])
        batch = {k: data[k][rows] for k in ("query_ids", "query_mask", "response_ids", "response_mask")}
        logits, _ = self._forward(batch)
        logp = logprobs_from_logits(logits, batch["response_ids"], self.config.temperature)
        sequence = masked_sum(logp, batch["response_mask"], dim=-1)
        ref = data["ref_sequence_logp"][rows]
        n, cfg = chosen.shape[0], self.config
        return dpo_loss(sequence[:n], sequence[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type, cfg.sft_weight,
                        batch["response_mask"][:n].sum(dim=-1))

    def _summary(self) -> dict:
        return {**super()._summary(), "trainer": "alignment.ppo.online_dpo.OnlineDPOTrainer"}
