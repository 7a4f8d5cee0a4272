"""`precision:`: the choice rule, the recipe key, what a run records, and fp32 log-probs under bf16 autocast."""

import json

import pytest
import torch

from alignment import precision as P
from alignment import recipe as recipes
from alignment.errors import RecipeError

AVX512_BF16 = P.Hardware("cpu", cpu_bf16_units=("avx512_bf16",), kernel_path="AVX512")
AMX = P.Hardware("cpu", cpu_bf16_units=("amx_bf16", "avx512_bf16"), kernel_path="AVX512")
AVX2_ONLY = P.Hardware("cpu", kernel_path="AVX2")


@pytest.mark.parametrize("hardware, parameters, chosen, words", [
    (AMX, 20_000_000, "bf16", "amx_bf16"),
    (AVX512_BF16, 20_000_000, "bf16", "avx512_bf16"),
    (AVX512_BF16, None, "bf16", "unknown size"),
    (AVX512_BF16, 900_000, "fp32", "0.9M parameters"),  # the demo model: overhead-bound, fp32 keeps its numerics
    (AVX2_ONLY, 20_000_000, "fp32", "no bf16 units"),
    (P.Hardware("cpu", cpu_bf16_units=("avx512_bf16",), onednn_max_isa="AVX2"), 20_000_000, "fp32",
     "ONEDNN_MAX_CPU_ISA"),
    (P.Hardware("cpu", cpu_bf16_units=("avx512_bf16",), onednn_max_isa="avx512_core_bf16"), 20_000_000, "bf16", ""),
    (P.Hardware("cuda", cuda_bf16=True), 900_000, "bf16", "GPU"),
    (P.Hardware("cuda", cuda_bf16=False), 900_000, "fp16", "loss scaling"),
])
def test_auto_follows_the_hardware_and_the_model_size(hardware, parameters, chosen, words):
    choice = P.choose("auto", hardware, parameters)
    assert choice.chosen == chosen
    assert words in choice.reason
    assert choice.trainer_flags() == {"bf16": chosen == "bf16", "fp16": chosen == "fp16"}
    assert choice.mixed_precision == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[chosen]


def test_the_size_threshold_is_inclusive():
    assert P.choose("auto", AVX512_BF16, P.CPU_BF16_MIN_PARAMETERS).chosen == "bf16"
    assert P.choose("auto", AVX512_BF16, P.CPU_BF16_MIN_PARAMETERS - 1).chosen == "fp32"


def test_explicit_precisions_win_or_are_refused_where_they_cannot_run():
    assert P.choose("fp32", AMX, 10**9).chosen == "fp32"
    assert P.choose("bf16", AVX512_BF16, 1).chosen == "bf16"  # asked: honoured on a small model too
    slow = P.choose("bf16", AVX2_ONLY, 10**8)
    assert slow.chosen == "bf16" and "slower than fp32" in slow.reason
    assert P.choose("fp16", P.Hardware("cuda", cuda_bf16=True)).chosen == "fp16"
    with pytest.raises(ValueError, match="fp16 .* needs a CUDA GPU"):
        P.choose("fp16", AMX)
    with pytest.raises(ValueError, match="does not compute bf16"):
        P.choose("bf16", P.Hardware("cuda", cuda_bf16=False))
    with pytest.raises(ValueError, match="choose one of auto, fp32, bf16, fp16"):
        P.choose("fp8", AMX)


def test_parameter_count_from_the_config_alone():
    small, large = P.parameter_count("tiny:1m"), P.parameter_count("tiny:20m")
    assert 300_000 < small < 2_000_000
    assert 15_000_000 < large < 30_000_000
    assert P.parameter_count("/no/such/model/dir") is None


def test_recipe_key_defaults_to_auto_and_is_overridden_on_the_command_line():
    assert recipes.load("recipes/tiny/sft.yaml").precision == "auto"
    assert recipes.load("recipes/tiny/sft.yaml", ["precision=fp32"]).precision == "fp32"
    with pytest.raises(RecipeError, match="precision"):
        recipes.load("recipes/tiny/sft.yaml", ["precision=fp8"])


@pytest.mark.parametrize("key", ["bf16", "fp16"])
def test_train_flag_beside_precision_names_both_keys(key, tmp_path):
    with pytest.raises(RecipeError) as caught:
        recipes.load("recipes/tiny/sft.yaml", [f"train.{key}=true"])
    message = str(caught.value)
    assert f"override 'train.{key}=true'" in message and f"precision: {key}" in message
    path = tmp_path / "r.yaml"
    path.write_text((recipes_text := open("recipes/tiny/sft.yaml").read()) + f"  {key}: true\n")
    with pytest.raises(RecipeError) as caught:
        recipes.load(path)
    line = len(recipes_text.splitlines()) + 1
    assert f"{path}:{line}" in str(caught.value) and f"train.{key}" in str(caught.value)


def test_auto_on_a_bf16_cpu_chooses_bf16_for_the_20m_preset(monkeypatch):
    monkeypatch.setattr(P, "detect", lambda: AVX512_BF16)
    assert P.for_recipe(recipes.load("recipes/tiny/sft.yaml", ["model.name_or_path=tiny:20m"])).chosen == "bf16"
    assert P.for_recipe(recipes.load("recipes/tiny/sft.yaml")).chosen == "fp32"  # tiny:1m
    monkeypatch.setattr(P, "detect", lambda: AVX2_ONLY)
    assert P.for_recipe(recipes.load("recipes/tiny/sft.yaml", ["model.name_or_path=tiny:20m"])).chosen == "fp32"


def test_a_run_prints_and_records_its_precision(tmp_path, capsys, monkeypatch):
    from alignment.stages import sft

    monkeypatch.setattr(P, "detect", lambda: AVX512_BF16)
    out = tmp_path / "sft"
    sft.run(recipes.load("recipes/tiny/sft.yaml", [
        "precision=bf16", "train.max_steps=2", "train.per_device_train_batch_size=8", "data.max_samples=32",
        "eval=null", "options.evaluate_before=false", f"output_dir={out}"]))
    info = json.loads((out / "run_info.json").read_text())
    assert info["precision"]["chosen"] == "bf16" and info["precision"]["requested"] == "bf16"
    assert "precision: bf16" in capsys.readouterr().out
    args = torch.load(out / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.bf16 is True  # what trl trained with


def test_fp32_logits_under_bf16_autocast():
    from policies.tiny import build_tiny_model, load_tiny_tokenizer

    model = build_tiny_model("1m", load_tiny_tokenizer(), seed=0).eval()
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        exact = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model(ids).logits
            with P.fp32_logits(model):
                kept = model(ids).logits
            after = model(ids).logits
    assert rounded.dtype == torch.bfloat16 and after.dtype == torch.bfloat16  # the block leaves the model as it was
    assert kept.dtype == torch.float32
    head_error = (kept - exact).abs().max().item()
    bf16_error = (rounded.float() - exact).abs().max().item()
    assert head_error < bf16_error  # only the body's bf16 remains; the head's rounding of every logit is gone
    assert "forward" not in vars(model.get_output_embeddings())


def test_our_ppo_loop_trains_under_bf16_with_fp32_log_probs(tmp_path, monkeypatch):
    """One PPO step at precision=bf16: the accelerator autocasts, the rollout's log-probs stay fp32, and the
    first update's ratio (same weights that sampled) is 1 up to the body's bf16 rounding, not the head's."""
    from accelerate.state import AcceleratorState, GradientState

    from alignment.metrics import read_records
    from alignment.ppo import trainer as trainer_module
    from alignment.stages import ppo

    seen = {}
    original_update = trainer_module.PPOTrainer._update

    def spy(self, data, *first):
        seen["mixed_precision"] = self.accelerator.mixed_precision
        seen["logprobs_dtype"] = self.last_rollout.logprobs.dtype
        stats = original_update(self, data, *first)
        seen["first_ratio"] = self.minibatch_stats[0]["policy/ratio_mean"]  # the update on the sampling weights
        return stats

    monkeypatch.setattr(trainer_module.PPOTrainer, "_update", spy)
    # the rollout's own log-prob pass (not the first update's forward, which would make the ratio 1 exactly)
    monkeypatch.setattr(trainer_module.PPOTrainer, "_holds_first_forward", lambda self: False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path / "ppo"
    ppo.run(recipes.load("recipes/tiny/ppo_rule.yaml", [
        "precision=bf16", "model.name_or_path=tiny:1m", "data.max_samples=16", "eval=null", "train.total_steps=1",
        "train.batch_size=8", "train.mini_batch_size=8", "train.ppo_epochs=2", "train.max_new_tokens=4",
        "train.logging_steps=1", "train.missing_eos_penalty=null", "options.evaluate_before=false",
        "options.progress_bar=false", "options.save_steps=1", "reward=[{source: answer_match}]",
        f"output_dir={out}"]))
    AcceleratorState._reset_state(True)  # the next test's accelerator starts from fp32
    GradientState._reset_state()
    first_ratio = seen.pop("first_ratio")
    assert seen == {"mixed_precision": "bf16", "logprobs_dtype": torch.float32}
    record = [r for r in read_records(out) if "reward/total" in r][0]
    assert all(torch.isfinite(torch.tensor(float(v))) for k, v in record.items()
               if isinstance(v, (int, float)) and k.startswith(("policy/", "value/", "kl/")))
    assert abs(first_ratio - 1.0) < 0.02  # (the step's mean also holds epoch 2, on the updated weights)
    assert json.loads((out / "run_info.json").read_text())["precision"]["chosen"] == "bf16"


def recording_sdpa(seen):
    """transformers' sdpa, recording the dtype and the autocast state each call computes in."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def record(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype, torch.is_autocast_enabled("cpu")))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    return record


def test_cpu_attention_in_fp32_under_bf16_autocast_only():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from policies.tiny import build_tiny_model, load_tiny_tokenizer

    model = build_tiny_model("1m", load_tiny_tokenizer(), seed=0).eval()
    ids = torch.randint(5, 200, (2, 12))
    seen = []
    ALL_ATTENTION_FUNCTIONS["sdpa"] = recording_sdpa(seen)
    try:
        recorder = ALL_ATTENTION_FUNCTIONS["sdpa"]
        with torch.no_grad():
            exact = model(ids).logits
            seen.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                plain = model(ids).logits
                plain_calls, seen[:] = list(seen), []
                with P.cpu_attention_in_fp32():
                    kept = model(ids).logits
                    fp32_calls, seen[:] = list(seen), []
            with P.cpu_attention_in_fp32():
                outside = model(ids).logits  # no autocast: transformers' own function, unchanged
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is recorder  # the block put back what was there
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    layers = model.config.num_hidden_layers
    # without the block, autocast sends sdpa to bf16 (its inputs arrive with autocast on); with it, fp32 and off
    assert len(plain_calls) == layers and all(autocast for *_, autocast in plain_calls)
    assert fp32_calls == [(torch.float32, torch.float32, torch.float32, False)] * layers
    assert torch.equal(outside, exact)
    assert kept.dtype == plain.dtype == torch.bfloat16 and not torch.equal(kept, plain)  # the block computed otherwise


def test_a_bf16_run_on_a_cpu_trains_with_fp32_attention(tmp_path, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from alignment.stages import sft

    monkeypatch.setattr(P, "detect", lambda: AVX512_BF16)
    seen = []
    ALL_ATTENTION_FUNCTIONS["sdpa"] = recording_sdpa(seen)
    try:
        sft.run(recipes.load("recipes/tiny/sft.yaml", [
            "precision=bf16", "train.max_steps=1", "train.per_device_train_batch_size=8", "data.max_samples=16",
            "eval=null", "options.evaluate_before=false", "train.save_strategy='no'", f"output_dir={tmp_path}"]))
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    training = [call for call in seen if call[:3] == (torch.float32,) * 3 and not call[3]]
    assert training and not [call for call in seen if call[3]]  # no attention ran under bf16 autocast
