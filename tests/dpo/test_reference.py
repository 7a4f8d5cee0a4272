"""The three ways of keeping the reference model give the same reference log-probs; recipe checks of the choice."""

import copy
from pathlib import Path

import pytest
import torch

from alignment import recipe as recipes
from alignment.errors import RecipeError
from alignment.stages import preference_common as pref


def dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def perturb_adapter(peft_model):
    """A fresh LoRA adapter is a no-op (B = 0); give it weights so policy and reference really differ."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_lora_without_copy_gives_the_frozen_copys_reference_logps(make_args, tiny_model, tiny_tokenizer, pair_rows):
    from trl import DPOConfig, DPOTrainer

    args = make_args(DPOConfig)
    frozen = DPOTrainer(model=copy.deepcopy(tiny_model), ref_model=copy.deepcopy(tiny_model), args=args,
                        train_dataset=dataset(pair_rows), processing_class=tiny_tokenizer)
    adapter = DPOTrainer(model=copy.deepcopy(tiny_model), args=make_args(DPOConfig), peft_config=lora_config(),
                         train_dataset=dataset(pair_rows), processing_class=tiny_tokenizer)
    assert adapter.ref_model is None, "with LoRA trl must keep no reference copy"
    perturb_adapter(adapter.model)
    batch = frozen.data_collator([frozen.train_dataset[i] for i in range(len(pair_rows))])

    copy_chosen, copy_rejected = frozen.compute_ref_log_probs(frozen.ref_model, batch)
    lora_chosen, lora_rejected = adapter.compute_ref_log_probs(adapter.model, batch)
    torch.testing.assert_close(lora_chosen, copy_chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(lora_rejected, copy_rejected, atol=1e-5, rtol=0)

    # the adapter is live in the policy: the policy's log-probs are not the reference's
    pairs = pref.tokenize_pairs(tiny_tokenizer, pair_rows)
    policy_chosen, _ = pref.pair_logps(adapter.model, tiny_tokenizer, pairs)
    assert max(abs(a - b) for a, b in zip(policy_chosen, copy_chosen.tolist())) > 1e-2


def test_precomputed_reference_logps_equal_the_frozen_copys(make_args, tiny_model, tiny_tokenizer, pair_rows):
    from trl import DPOConfig, DPOTrainer

    frozen = DPOTrainer(model=copy.deepcopy(tiny_model), ref_model=copy.deepcopy(tiny_model),
                        args=make_args(DPOConfig), train_dataset=dataset(pair_rows), processing_class=tiny_tokenizer)
    precomputed = DPOTrainer(model=copy.deepcopy(tiny_model), args=make_args(DPOConfig, precompute_ref_log_probs=True),
                             train_dataset=dataset(pair_rows), processing_class=tiny_tokenizer)
    assert precomputed.ref_model is None
    batch = frozen.data_collator([frozen.train_dataset[i] for i in range(len(pair_rows))])
    copy_chosen, copy_rejected = frozen.compute_ref_log_probs(frozen.ref_model, batch)
    torch.testing.assert_close(torch.tensor(precomputed.train_dataset["ref_chosen_logps"]), copy_chosen,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(precomputed.train_dataset["ref_rejected_logps"]), copy_rejected,
                               atol=1e-5, rtol=0)


def as_text(rows):
    """The same pairs as standard (string) rows: prompt text, answers with a leading space."""
    return [{"prompt": r["prompt"][0]["content"], "chosen": " " + r["chosen"][0]["content"],
             "rejected": " " + r["rejected"][0]["content"]} for r in rows]


@pytest.mark.parametrize("form", ["conversational", "standard"])
def test_our_held_out_logps_match_trls(form, make_args, tiny_model, tiny_tokenizer, pair_rows):
    """The held-out metrics tokenize and score pairs exactly as trl's DPOTrainer does."""
    from trl import DPOConfig, DPOTrainer

    pair_rows = pair_rows if form == "conversational" else as_text(pair_rows)

    frozen = DPOTrainer(model=copy.deepcopy(tiny_model), ref_model=copy.deepcopy(tiny_model),
                        args=make_args(DPOConfig), train_dataset=dataset(pair_rows), processing_class=tiny_tokenizer)
    batch = frozen.data_collator([frozen.train_dataset[i] for i in range(len(pair_rows))])
    trl_chosen, trl_rejected = frozen.compute_ref_log_probs(frozen.ref_model, batch)
    ours_chosen, ours_rejected = pref.pair_logps(tiny_model, tiny_tokenizer, pref.tokenize_pairs(tiny_tokenizer, pair_rows))
    torch.testing.assert_close(torch.tensor(ours_chosen), trl_chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(ours_rejected), trl_rejected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- options.reference in recipes


def dpo_recipe(*overrides):
    return recipes.load("recipes/tiny/dpo.yaml", list(overrides))


def args_for(recipe):
    from trl import DPOConfig

    from alignment.stages import common

    return common.build_trainer_config(recipe, DPOConfig, common.trainer_defaults(recipe, Path("/tmp/unused")))


def test_auto_reference_follows_the_measured_rule():
    demo = dpo_recipe()  # 150 steps x 32 pairs over 4,193 pairs: 1.1 epochs
    assert pref.choose_reference(demo, args_for(demo), 4193) == "copy"
    longer = dpo_recipe("train.max_steps=450")  # 3.4 epochs: precomputing pays for itself
    assert pref.choose_reference(longer, args_for(longer), 4193) == "precomputed"
    epochs = dpo_recipe("train.max_steps=-1", "train.num_train_epochs=2")
    assert pref.choose_reference(epochs, args_for(epochs), 4193) == "precomputed"
    lora = dpo_recipe("model.lora={r: 4}", "train.max_steps=450")
    assert pref.choose_reference(lora, args_for(lora), 4193) == "adapter"
    chosen = dpo_recipe("options.reference=copy", "train.max_steps=450")
    assert pref.choose_reference(chosen, args_for(chosen), 4193) == "copy"


def test_adapter_reference_without_lora_is_a_recipe_error():
    with pytest.raises(RecipeError, match="needs model.lora"):
        pref.check_reference(dpo_recipe("options.reference=adapter"))


def test_precompute_set_in_train_is_pointed_to_the_one_key():
    with pytest.raises(RecipeError, match="options.reference: precomputed"):
        pref.check_reference(dpo_recipe("train.precompute_ref_log_probs=true"))


def test_unknown_reference_mode_is_rejected_when_the_recipe_loads():
    with pytest.raises(RecipeError, match="did you mean 'copy'"):
        dpo_recipe("options.reference=cpy")


def test_reference_setup_gives_a_frozen_separate_copy_or_the_precompute_flag(tiny_model):
    args = args_for(dpo_recipe())
    reference = pref.reference_setup("copy", tiny_model, args)["ref_model"]
    assert reference is not tiny_model and args.precompute_ref_log_probs is False
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), tiny_model.state_dict().values()))
    assert pref.reference_setup("precomputed", tiny_model, args) == {} and args.precompute_ref_log_probs is True
    assert pref.reference_setup("adapter", tiny_model, args) == {} and args.precompute_ref_log_probs is False
