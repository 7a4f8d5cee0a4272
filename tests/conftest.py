"""Shared fixtures: offline environment, the repository root, and a trained tiny SFT checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep, not spin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Recipes name data files relative to the repository root, as the README runs them."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from policies.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """The tiny demo's SFT recipe, run once per test session (about 2 minutes on 2 cores)."""
    from alignment import recipe as recipes
    from alignment.stages import sft

    out = tmp_path_factory.mktemp("sft")
    os.chdir(ROOT)
    metrics = sft.run(recipes.load(ROOT / "recipes/tiny/sft.yaml", [f"output_dir={out}"]))
    return out, metrics


@pytest.fixture
def assert_demo_gain():
    return _assert_demo_gain


def _assert_demo_gain(metrics: dict, points: float = 0.10) -> None:
    """An RL stage on the tiny demo: greedy held-out accuracy up `points`, KL to the start finite."""
    import math

    before, after = metrics["before"], metrics["after"]
    print(metrics["summary"], f"(sampled {before['sampled_accuracy']:.3f} -> {after['sampled_accuracy']:.3f}, "
          f"kl {metrics['train_kl_per_sequence_last']:.3f} nats per response)")
    assert after["greedy_accuracy"] - before["greedy_accuracy"] >= points, metrics["summary"]
    assert math.isfinite(metrics["train_kl_per_sequence_last"])


@pytest.fixture
def fresh_accelerate_state():
    """A clean accelerate state before and after a test (gradient accumulation is a process-wide singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
