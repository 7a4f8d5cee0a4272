"""vLLM sampling for our PPO's rollouts (``PPOConfig.use_vllm``), on trl's ``VLLMGeneration``.

    sampler = VLLMSampler(config, policy, accelerator, tokenizer)   # after accelerator.prepare
    sampler.sync()                                                  # every PPO step, before sampling
    response_ids = sampler.sample(query_ids, query_mask)            # what generate_responses returns

trl's helper does the vLLM work: the engine in this process ("colocate") or
a ``trl vllm-serve`` server ("server"), and ``sync_weights`` pushing the
current training weights into it (PEFT adapters merged, FSDP/ZeRO-3 gathered).
The policy changes after every PPO update, so :meth:`VLLMSampler.sync` must
run before each rollout: that is what keeps the rollouts on-policy.

Sampling is the HF path's: pure ancestral sampling at the config's
temperature (top_p 1, top_k 0 = off, min_p 0, no repetition penalty), at most
``max_new_tokens`` tokens, stopping at the same EOS ids. vLLM returns each
completion up to and including its EOS; they are right-padded here and cut at
the first EOS by :func:`alignment.ppo.rollout.truncate_after_eos` as before.

vLLM's sampler is not bit-identical to transformers' ``generate``: its kernels
and its RNG stream (seeded per process by trl, not from ``PPOConfig.seed``)
differ, so the same seed samples other responses than the HF path. The loss is
unaffected: the log-probs, values and entropy PPO uses are recomputed by our
own forward pass over the sampled tokens, exactly as for HF rollouts.
"""

from __future__ import annotations

import torch
from trl.generation.vllm_generation import VLLMGeneration

from alignment.ppo.rollout import stop_token_ids
from policies.load import vllm_problem
from policies.value import CausalLMWithValueHead

__all__ = ["VLLMSampler", "check_vllm_machine"]


def check_vllm_machine() -> None:
    """Refuse ``use_vllm`` on a machine without a CUDA GPU or the vllm package, before any model work."""
    problem = vllm_problem()
    if problem:
        raise ValueError(f"PPOConfig.use_vllm (train.use_vllm in a recipe): {problem}")


class VLLMSampler:
    """Samples PPO responses with vLLM; a drop-in for :func:`alignment.ppo.rollout.generate_responses`.

    Args:
        config: the :class:`alignment.ppo.PPOConfig` (``use_vllm`` and the ``vllm_*`` keys).
        policy: the unwrapped policy (a causal LM, peft or not, or a ``CausalLMWithValueHead``:
            its language model is what vLLM gets).
        accelerator: the trainer's accelerator, after ``prepare``.
        tokenizer: its pad token right-pads the responses.
    """

    def __init__(self, config, policy, accelerator, tokenizer):
        lm = policy.pretrained_model if isinstance(policy, CausalLMWithValueHead) else policy
        if config.vllm_mode == "colocate" and not getattr(lm, "name_or_path", ""):
            raise ValueError(
                "PPOConfig.use_vllm with vllm_mode 'colocate': vLLM loads the policy from its name_or_path, "
                "which is empty (a model built in memory); save it and load it from that directory first "
                "(the ppo stage does this for tiny: models)"
            )
        self.eos_token_ids = stop_token_ids(tokenizer, lm)
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.max_new_tokens = int(config.max_new_tokens)
        self.generation = VLLMGeneration(
            model=lm,
            accelerator=accelerator,
            processing_class=tokenizer,
            mode=config.vllm_mode,
            server_base_url=config.vllm_server_base_url,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            max_model_length=config.vllm_max_model_length,
            max_num_seqs=config.batch_size,
            repetition_penalty=1.0,
            temperature=float(config.temperature),
            top_p=1.0,
            top_k=0,  # what trl passes for "off" (its own default)
            min_p=0.0,
            max_completion_length=self.max_new_tokens,
            generation_kwargs={"stop_token_ids": list(self.eos_token_ids)},
        )

    def sync(self) -> None:
        """Push the policy's current weights into vLLM (once per PPO step, before sampling)."""
        self.generation.sync_weights()

    @torch.no_grad()
    def sample(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Responses ``(B, <= max_new_tokens)``, right-padded with the pad id, for left-padded prompts."""
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids, query_mask)]
        _, completions, _, _ = self.generation.generate(prompts=prompts, images=None, num_generations=1)
        if len(completions) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(completions)} completions for {len(prompts)} prompts")
        width = max(1, max((len(c) for c in completions), default=0))
        response = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        eos = set(self.eos_token_ids)
        for i, completion in enumerate(completions):
            completion = [int(t) for t in completion]
            if len(completion) > self.max_new_tokens:
                raise RuntimeError(f"vLLM returned {len(completion)} tokens, more than max_new_tokens "
                                   f"({self.max_new_tokens})")
            if len(completion) < self.max_new_tokens and not eos.intersection(completion):
                # padding would count as response tokens (a response with no EOS is masked in full)
                raise RuntimeError(
                    f"vLLM stopped a response after {len(completion)} tokens with no EOS, before max_new_tokens "
                    f"({self.max_new_tokens}): prompt + response reached vLLM's context length; raise "
                    "PPOConfig.vllm_max_model_length or shorten the prompts"
                )
            if completion:
                response[i, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        return response.to(query_ids.device)
