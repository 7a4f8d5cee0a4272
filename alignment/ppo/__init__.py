"""Our PPO for language models: pure math (losses), rollout (generate + score), trainer, config.

from alignment.ppo import PPOConfig, PPOTrainer
trainer = PPOTrainer(PPOConfig(...), policy, ref_policy, critic, tokenizer, reward_fn, prompts)
trainer.train()
"""

from alignment.ppo.config import PPOConfig
from alignment.ppo.trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
