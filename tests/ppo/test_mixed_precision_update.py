"""Under bf16 autocast, every update forward of a PPO step sees the weights of the optimizer step before it.

A step runs in one autocast region, and autocast caches the bf16 copy of each trainable weight until the
region ends; the trainer must drop that cache after each optimizer step, or the later epochs of the step run
on the weights the step started with.
"""

import copy

import torch

from alignment.ppo import PPOConfig, PPOTrainer
from alignment.ppo.rollout import response_forward
from alignment.ppo.trainer import make_accelerator
from alignment.precision import cpu_attention_in_fp32, fp32_logits

from .conftest import make_llama, make_seq_critic

PROMPTS = [{"prompt": p} for p in ("a b", "c d e", "f", "g h a b")]


def length_reward(prompts, completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def test_each_update_forward_uses_the_weights_after_the_last_optimizer_step(tokenizer):
    config = PPOConfig(learning_rate=1e-2, batch_size=4, mini_batch_size=4, ppo_epochs=3, max_new_tokens=4,
                       temperature=0.7, total_steps=1, seed=0)
    lm = make_llama(tokenizer, seed=0)
    trainer = PPOTrainer(config, lm, copy.deepcopy(lm), make_seq_critic(tokenizer), tokenizer, length_reward,
                         PROMPTS, accelerator=make_accelerator(config, "bf16"))
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    seen = []  # (policy weights before the forward, the logits it gave)
    forward = trainer._forward

    def recording_forward(batch):
        state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        logits, values = forward(batch)
        seen.append((state, batch, logits.detach().clone()))
        return logits, values

    trainer._forward = recording_forward
    trainer.step()
    assert len(seen) == 3
    assert not torch.equal(seen[0][0]["model.layers.0.mlp.up_proj.weight"],
                           seen[2][0]["model.layers.0.mlp.up_proj.weight"])  # the updates moved the weights
    for state, batch, logits in seen[1:]:
        fresh = copy.deepcopy(policy)
        fresh.load_state_dict(state)
        # a fresh region (no cache), computed as the trainer's step computes: fp32 head, fp32 attention on a CPU
        with torch.autocast("cpu", dtype=torch.bfloat16), fp32_logits(fresh), cpu_attention_in_fp32():
            expected, _ = response_forward(fresh, batch["query_ids"], batch["query_mask"], batch["response_ids"],
                                           batch["response_mask"])
        assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()
