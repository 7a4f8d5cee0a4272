"""Every loss the preference stages offer trains: finite loss, parameters changed (tiny model, a few rows)."""

import copy
import math

import pytest
import torch

# trl 1.16's DPO loss family (DPOConfig.loss_type), with the settings a loss needs
DPO_LOSSES = [
    ("sigmoid", {}),
    ("hinge", {}),
    ("ipo", {}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}),
    ("robust", {"label_smoothing": 0.1}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("aot", {}),
    ("aot_unpaired", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {}),
    ("sigmoid_norm", {}),
    (["sigmoid", "sft"], {"loss_weights": [1.0, 1.0]}),
    ("sigmoid", {"ld_alpha": 0.5}),
]


def trained(trainer, model_before):
    """(final loss, number of parameter tensors that changed) after trainer.train()."""
    before = {k: v.detach().clone() for k, v in model_before.state_dict().items()}
    output = trainer.train()
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    changed = sum(not torch.equal(before[k], v) for k, v in after.items() if k in before)
    return output.training_loss, changed


def dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("loss_type,extra", DPO_LOSSES, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_dpo_loss_trains(loss_type, extra, make_args, tiny_model, tiny_tokenizer, pair_rows):
    from trl import DPOConfig, DPOTrainer

    args = make_args(DPOConfig, loss_type=loss_type, beta=0.1, **extra)
    trainer = DPOTrainer(model=tiny_model, ref_model=copy.deepcopy(tiny_model), args=args,
                         train_dataset=dataset(pair_rows), processing_class=tiny_tokenizer)
    loss, changed = trained(trainer, tiny_model)
    assert math.isfinite(loss)
    assert changed > 0


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_trains_on_unpaired_pairs(loss_type, make_args, tiny_model, tiny_tokenizer, pair_rows):
    from trl import KTOConfig, KTOTrainer

    from alignment.stages.preference_common import unpair

    args = make_args(KTOConfig, loss_type=loss_type, per_device_train_batch_size=8)
    trainer = KTOTrainer(model=tiny_model, ref_model=copy.deepcopy(tiny_model), args=args,
                         train_dataset=dataset(unpair(pair_rows)), processing_class=tiny_tokenizer)
    loss, changed = trained(trainer, tiny_model)
    assert math.isfinite(loss) and changed > 0


@pytest.mark.parametrize("stage,extra", [
    ("orpo", {}),
    ("cpo", {"loss_type": "sigmoid"}),
    ("cpo", {"loss_type": "hinge"}),
    ("cpo", {"loss_type": "ipo"}),
    ("simpo", {"loss_type": "simpo", "cpo_alpha": 0.0}),
], ids=["orpo", "cpo-sigmoid", "cpo-hinge", "cpo-ipo", "simpo"])
def test_reference_free_relative_trains(stage, extra, make_args, tiny_model, tiny_tokenizer, pair_rows):
    import importlib

    from alignment.stages.preference_relatives import TRAINERS

    module_name, config_name, trainer_name = TRAINERS[stage]
    module = importlib.import_module(module_name)
    args = make_args(getattr(module, config_name), remove_unused_columns=False, max_length=64, **extra)
    trainer = getattr(module, trainer_name)(model=tiny_model, args=args, train_dataset=dataset(pair_rows),
                                            processing_class=tiny_tokenizer)
    loss, changed = trained(trainer, tiny_model)
    assert math.isfinite(loss) and changed > 0


def test_dpo_trains_on_standard_text_pairs_with_implicit_prompts(make_args, tiny_model, tiny_tokenizer, pair_rows):
    """Standard (string) pairs without a prompt column: the shared start becomes the prompt, then DPO trains."""
    from trl import DPOConfig, DPOTrainer

    from alignment.stages.preference_common import extract_prompt

    rows = [{"chosen": f"{r['prompt'][0]['content']} {r['chosen'][0]['content']}",
             "rejected": f"{r['prompt'][0]['content']} {r['rejected'][0]['content']}"} for r in pair_rows]
    rows = [extract_prompt(r) for r in rows]
    assert all(r["prompt"].endswith("?") and r["chosen"].startswith(" ") for r in rows)
    trainer = DPOTrainer(model=tiny_model, ref_model=copy.deepcopy(tiny_model), args=make_args(DPOConfig),
                         train_dataset=dataset(rows), processing_class=tiny_tokenizer)
    loss, changed = trained(trainer, tiny_model)
    assert math.isfinite(loss) and changed > 0
