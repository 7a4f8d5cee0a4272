"""Round two of the reliability checklist (items 35-46 of RELIABILITY.md; issue 17).

Each test pins one fix: it failed on the code before the fix.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from tests.reliability.conftest import write_jsonl


# ----------------------------------------------------------------------------- 35 (issue item 1): repeated pairs


def _pair_recipe(tmp_path, rows, *overrides):
    from alignment import recipe as recipes

    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return recipes.load("recipes/tiny/dpo.yaml", [f"data.train={train}", "data.eval=null", "eval=null",
                                                  f"output_dir={tmp_path / 'run'}", *overrides])


def _votes():
    """One prompt, repeated Bradley-Terry votes: 'a' beats 'b' 3 times, 'b' beats 'a' once, 'a' beats 'c' twice."""
    row = lambda chosen, rejected: {"prompt": "Q: pick", "chosen": f" {chosen}", "rejected": f" {rejected}"}  # noqa: E731
    return [row("a", "b")] * 3 + [row("b", "a")] + [row("a", "c")] * 2


def test_item_35_repeated_preference_rows_are_kept_by_default_and_counted(tmp_path, tiny_tokenizer):
    from alignment.stages.preference_common import prepare_pairs

    pairs = prepare_pairs(_pair_recipe(tmp_path, _votes()), tiny_tokenizer, 64)
    report = pairs.reports[0]
    assert len(pairs.train) == 6 and report["rows_kept"] == 6, report  # the votes carry the label frequencies
    assert "duplicate pair" not in report["dropped"]
    # a > b three times: 2 exact repeats; a > c twice: 1 repeat; a > b and b > a: 4 rows contradict another
    assert report["repeats"] == {"exact repeats": 3, "contradictory rows": 4}, report


def test_item_35_deduplication_is_opt_in_and_still_counts(tmp_path, tiny_tokenizer):
    from alignment.stages.preference_common import prepare_pairs

    pairs = prepare_pairs(_pair_recipe(tmp_path, _votes(), "options.drop_duplicates=true"), tiny_tokenizer, 64)
    report = pairs.reports[0]
    assert len(pairs.train) == 3 and report["dropped"]["duplicate pair"] == 3, report
    assert report["repeats"] == {"exact repeats": 3, "contradictory rows": 4}, report


# ----------------------------------------------------------------------------- 46 (issue item 12): safetensors first


def test_item_46_safetensors_are_preferred_even_when_pickle_is_allowed(tmp_path):
    import torch

    import policies

    model, tokenizer = policies.load("tiny:1m", seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    other = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    torch.save(other, tmp_path / "pytorch_model.bin")  # a different (pickled) copy beside the safetensors
    loaded, _ = policies.load(str(tmp_path), allow_pickle=True, device="cpu", dtype="float32")
    first = next(iter(model.state_dict()))
    assert torch.equal(loaded.state_dict()[first], model.state_dict()[first]), "the pickle was loaded"


# ----------------------------------------------------------------------------- 38 (issue item 4): no silent switch-off


def _config_with_an_unresolvable_hint():
    """A trainer config whose hints do not all resolve (like a trl config naming an optional package's type)."""
    import dataclasses

    namespace: dict = {}
    exec("from __future__ import annotations\nimport dataclasses\n"  # noqa: S102 - a class with a string hint
         "@dataclasses.dataclass\nclass SomeConfig:\n    learning_rate: float = 1e-3\n"
         "    callbacks: NotInstalledType | None = None\n", namespace)
    assert dataclasses.is_dataclass(namespace["SomeConfig"])
    return namespace["SomeConfig"]


def test_item_38_an_unresolvable_type_hint_does_not_switch_the_type_checks_off():
    from alignment import recipe as recipes
    from alignment.errors import RecipeError

    config = _config_with_an_unresolvable_hint()
    locations = recipes.Locations("r.yaml")
    with pytest.warns(RuntimeWarning, match="callbacks"):
        with pytest.raises(RecipeError, match="learning_rate"):
            recipes.validate_train_section({"learning_rate": "fast"}, config, locations)


def test_item_38_sft_token_audit_without_labels_is_an_error():
    from types import SimpleNamespace

    import datasets

    from alignment.errors import TrainingError
    from alignment.stages.common import audit_sft_tokens

    trainer = SimpleNamespace(train_dataset=datasets.Dataset.from_list([{"input_ids": [1, 2, 3]}]))
    with pytest.raises(TrainingError, match="labels"):
        audit_sft_tokens(trainer, SimpleNamespace(), Path("."))
