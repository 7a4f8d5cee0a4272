"""Tiny trainers for the preference tests: a ~1M-parameter model and a handful of demo pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# The models are tiny: one thread is fastest, and it keeps the tests quick on a shared, busy CPU.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]

TRAINER_ARGS = dict(bf16=False, use_cpu=True, report_to="none", save_strategy="no", gradient_checkpointing=False,
                    disable_tqdm=True, per_device_train_batch_size=4, logging_steps=1, max_steps=2,
                    learning_rate=1e-2, lr_scheduler_type="constant", dataloader_num_workers=0)


@pytest.fixture(scope="session")
def pair_rows():
    """Eight conversational prompt/chosen/rejected rows of the demo task."""
    with (ROOT / "data/tiny_arith/preference.jsonl").open() as handle:
        return [json.loads(next(handle)) for _ in range(8)]


@pytest.fixture
def tiny_model():
    import policies

    model, _ = policies.load("tiny:1m", seed=0)
    return model


@pytest.fixture
def make_args(tmp_path):
    """make_args(ConfigClass, **overrides): a CPU, fp32, quiet trainer config for two tiny steps."""

    def make(config_class, **overrides):
        return config_class(output_dir=str(tmp_path / "out"), **{**TRAINER_ARGS, **overrides})

    return make
