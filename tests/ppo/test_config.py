"""PPOConfig validation: a bad value raises ValueError naming the key."""

import pytest

from alignment.ppo import PPOConfig


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": -1e-5}, "learning_rate"),
        ({"critic_learning_rate": 0}, "critic_learning_rate"),
        ({"batch_size": 10, "mini_batch_size": 4}, "batch_size"),
        ({"batch_size": 8, "mini_batch_size": 4, "gradient_accumulation_steps": 4}, "batch_size"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
        ({"ppo_epochs": 1.5}, "ppo_epochs"),
        ({"temperature": 0}, "temperature"),
        ({"gamma": 1.5}, "gamma"),
        ({"lam": -0.1}, "lam"),
        ({"cliprange": 0}, "cliprange"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"warn_or_stop": "panic"}, "warn_or_stop"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type"),
        ({"max_kl": float("nan")}, "max_kl"),
        ({"learning_rate": "1e-5"}, "learning_rate"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"generation_chunk_size": 0}, "generation_chunk_size"),
        ({"batch_size": 8, "mini_batch_size": 4, "generation_chunk_size": 3}, "generation_chunk_size"),
    ],
)
def test_invalid_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        PPOConfig(**kwargs)


def test_defaults_and_derived_sizes():
    cfg = PPOConfig()
    assert cfg.ppo_epochs == 4 and cfg.gamma == 1.0 and cfg.lam == 0.95 and cfg.cliprange == 0.2
    cfg = PPOConfig(
        batch_size=16, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=3, total_episodes=160
    )
    assert cfg.updates_per_step == 3 * 16 // 8 and cfg.num_steps == 10
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="clip_range"):
        PPOConfig.from_dict({"clip_range": 0.2})
