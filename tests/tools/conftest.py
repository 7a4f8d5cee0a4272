"""Fixtures for the tool tests: a tiny model saved as a plain transformers directory."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny:1m (random init, seeded) saved with its tokenizer: a checkpoint directory in under a second.

    Seed 2 because that random model answers with visible text ("888888"), so the chat
    tests compare a real streamed answer (other seeds answer with newlines or nothing).
    """
    import policies

    path = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = policies.load("tiny:1m", seed=2)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def align():
    """`align(*argv)` runs the CLI in this process and returns its exit status."""
    from alignment import cli

    def run(*argv) -> int:
        return cli.main([str(a) for a in argv])

    return run


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One thread: on a shared 2-core machine, two threads per process make tiny models many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
