"""Helpers for the reliability checklist tests (docs/reliability.md maps every item to its test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# A few steps of the tiny SFT recipe on a handful of rows, without the held-out evaluations.
TINY_SFT = [
    "data.max_samples=32",
    "eval=null",
    "options.evaluate_before=false",
    "train.per_device_train_batch_size=8",
    "train.max_steps=2",
    "train.logging_steps=1",
    "train.save_steps=1000",
    "train.disable_tqdm=true",
]


def write_jsonl(path: Path, rows) -> str:
    """Rows (dicts, or raw strings written as they are) to a JSONL file; returns its path as a string."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def sft_recipe(output_dir, *overrides):
    from alignment import recipe as recipes

    return recipes.load("recipes/tiny/sft.yaml", TINY_SFT + [f"output_dir={output_dir}", *overrides])


def run_sft(output_dir, *overrides) -> dict:
    from alignment.stages import sft

    return sft.run(sft_recipe(output_dir, *overrides))


def logged(run_dir) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loss_curve(run_dir) -> dict[int, float]:
    """step -> training loss; a step logged twice (before a kill and again after resuming) keeps its last value."""
    return {r["step"]: r["loss"] for r in logged(run_dir) if "loss" in r and "train_loss" not in r}


def chat_rows(n: int, start: int = 0) -> list[dict]:
    """Conversational prompt/completion rows like the demo's."""
    return [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}],
             "completion": [{"role": "assistant", "content": str(2 * i + 1)}]} for i in range(start, start + n)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny:1m model and tokenizer saved as a local directory (safetensors)."""
    import policies

    out = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = policies.load("tiny:1m", seed=42)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def model_dir_with_tokenizer(base: Path, out: Path, **changes) -> Path:
    """A copy of `base` whose tokenizer has attributes changed (chat_template=None, pad_token=..., ...)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(base, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for name, value in changes.items():
        setattr(tokenizer, name, value)
    for stale in ("chat_template.jinja", "chat_template.json"):
        (out / stale).unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    return out
