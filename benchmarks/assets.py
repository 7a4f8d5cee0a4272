"""The models both sides load: saved once per preset, so ours and the peer start from identical weights.

    <folder>/policy/   causal LM (tiny preset, seed 42) + tokenizer with chat template
    <folder>/reward/   sequence classification (one label; same preset, seed 42) + tokenizer:
                       the reward model's starting point, and the PPO reward and value models

Written with ``save_pretrained`` (safetensors, fp32); loaded by plain
``from_pretrained`` on both sides (our ``policies.load`` does the same for a
directory), so nothing but the trainer differs.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 42
MARKER = "assets.json"


def build(preset: str, folder: str | Path, seed: int = SEED) -> dict:
    """Save the tiny policy and reward/value model of `preset` under `folder`; return a description."""
    from transformers import AutoModelForSequenceClassification

    from benchmarks.measure import matmul_parameters
    from policies.tiny import PRESETS, build_tiny_model, load_tiny_tokenizer, tiny_config

    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("preset") == preset and info.get("seed") == seed:
            return info
    tokenizer = load_tiny_tokenizer()
    policy = build_tiny_model(preset, tokenizer, seed=seed)
    reward = _sequence_classifier(preset, tokenizer, seed, tiny_config, AutoModelForSequenceClassification)
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(str(folder / name), safe_serialization=True)
        tokenizer.save_pretrained(str(folder / name))
    info = {
        "preset": preset,
        "seed": seed,
        "architecture": PRESETS[preset].architecture,
        "parameters": sum(p.numel() for p in policy.parameters()),
        "matmul_parameters": matmul_parameters(policy),
        "reward_parameters": sum(p.numel() for p in reward.parameters()),
        "reward_matmul_parameters": matmul_parameters(reward),
        "vocab_size": len(tokenizer),
        "policy": str(folder / "policy"),
        "reward": str(folder / "reward"),
    }
    marker.write_text(json.dumps(info, indent=1))
    return info


def _sequence_classifier(preset, tokenizer, seed, tiny_config, model_class):
    """A one-label sequence classifier of the preset's shape, seeded (policies.tiny builds causal LMs only)."""
    import torch

    config = tiny_config(preset, tokenizer)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class.from_config(config)
