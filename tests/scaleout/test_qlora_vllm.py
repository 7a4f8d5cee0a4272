"""QLoRA (`model.quantization`) and vLLM (`train.use_vllm`): validation, the refusals on a machine that
cannot run them, and the BitsAndBytesConfig handed to transformers (CUDA and bitsandbytes faked, CPU only)."""

from __future__ import annotations

import copy
import importlib
import textwrap
from types import SimpleNamespace

import pytest
import torch

from alignment import recipe as recipes
from alignment.errors import RecipeError

load_module = importlib.import_module("policies.load")  # `policies.load` the attribute is the function

QLORA = """\
# align run x.yaml
stage: sft
model:
  name_or_path: some-org/some-model
  lora: {r: 8}
  quantization: 4bit
data:
  train: data/tiny_arith/sft.jsonl
output_dir: OUT
"""


def write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text).replace("OUT", str(tmp_path / "run")))
    return path


def fake_machine(monkeypatch, *, cuda: bool, packages=(), bf16: bool = True) -> None:
    """Pretend this machine has (or lacks) a CUDA GPU and the named optional packages."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(load_module, "package_available", lambda name: name in packages)


# ----------------------------------------------------------------------------- recipe validation


def test_quantization_key_validates(tmp_path):
    recipe = recipes.load(write(tmp_path, QLORA))
    assert recipe.model.quantization == "4bit"
    assert recipes.load(write(tmp_path, QLORA), ["model.quantization=8bit"]).model.quantization == "8bit"
    assert recipes.load(write(tmp_path, QLORA), ["model.quantization=null"]).model.quantization is None


def test_quantization_value_typo_suggests_the_right_one(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.quantization: .*did you mean '4bit'"):
        recipes.load(write(tmp_path, QLORA), ["model.quantization=4bits"])


def test_quantization_key_typo_suggests_the_right_one(tmp_path):
    text = QLORA.replace("quantization:", "quantisation:")
    with pytest.raises(RecipeError, match=r"model\.quantisation: unknown key .*did you mean 'quantization'"):
        recipes.load(write(tmp_path, text))


def test_quantization_needs_lora(tmp_path):
    with pytest.raises(RecipeError, match=r"r\.yaml:5: model\.quantization: 4bit needs model\.lora"):
        recipes.load(write(tmp_path, QLORA.replace("  lora: {r: 8}\n", "")))


def test_quantization_of_a_tiny_model_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.quantization: tiny: models are built in memory"):
        recipes.load(write(tmp_path, QLORA), ["model.name_or_path=tiny:1m"])


# ----------------------------------------------------------------------------- refusals at run time


def test_quantization_without_cuda_is_refused_before_the_run_dir(tmp_path, monkeypatch):
    from alignment.stages import sft

    fake_machine(monkeypatch, cuda=False, packages=("bitsandbytes",))
    recipe = recipes.load(write(tmp_path, QLORA))
    with pytest.raises(RecipeError, match=r"model\.quantization: 4bit: bitsandbytes quantization runs on CUDA "
                                          r"GPUs; this machine has none"):
        sft.run(recipe)
    assert not (tmp_path / "run").exists()


def test_quantization_without_bitsandbytes_says_how_to_install(tmp_path, monkeypatch):
    from alignment.stages import common

    fake_machine(monkeypatch, cuda=True, packages=())
    recipe = recipes.load(write(tmp_path, QLORA))
    with pytest.raises(RecipeError, match=r"model\.quantization: 4bit: needs the bitsandbytes package.*"
                                          r"pip install -e '\.\[gpu\]'.*pip install bitsandbytes"):
        common.load_policy(recipe)


def test_policies_load_refuses_too(monkeypatch):
    import policies

    fake_machine(monkeypatch, cuda=False)
    with pytest.raises(RecipeError, match=r"model\.quantization: bitsandbytes quantization runs on CUDA GPUs"):
        policies.load("some-org/some-model", quantization="8bit")


# ----------------------------------------------------------------------------- what transformers receives


@pytest.fixture
def captured_load(tmp_path, monkeypatch):
    """A checkpoint directory holding only the tiny tokenizer; from_pretrained records its kwargs, returns tiny."""
    from transformers import AutoModelForCausalLM

    from policies.tiny import build_tiny_model, load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    checkpoint = tmp_path / "checkpoint"
    tokenizer.save_pretrained(str(checkpoint))
    tiny = build_tiny_model("1m", tokenizer, seed=0)  # built before CUDA is faked: seeding would touch it
    calls = []

    def from_pretrained(spec, **kwargs):
        calls.append(kwargs)
        model = copy.deepcopy(tiny)
        if "quantization_config" in kwargs:
            model.is_loaded_in_4bit = True  # what a bitsandbytes load sets (peft reads it)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return checkpoint, calls


@pytest.mark.parametrize("bf16, compute", [(True, torch.bfloat16), (False, torch.float16)])
def test_4bit_is_nf4_double_quantized(captured_load, monkeypatch, bf16, compute):
    import policies

    checkpoint, calls = captured_load
    fake_machine(monkeypatch, cuda=True, packages=("bitsandbytes",), bf16=bf16)
    policies.load(str(checkpoint), quantization="4bit")
    config = calls[0]["quantization_config"]
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == compute
    assert calls[0]["device_map"] == {"": 0}


def test_8bit_is_llm_int8(captured_load, monkeypatch):
    import policies

    checkpoint, calls = captured_load
    fake_machine(monkeypatch, cuda=True, packages=("bitsandbytes",))
    monkeypatch.setenv("LOCAL_RANK", "1")
    policies.load(str(checkpoint), quantization="8bit")
    config = calls[0]["quantization_config"]
    assert config.load_in_8bit and not config.load_in_4bit
    assert calls[0]["device_map"] == {"": 1}  # this process's GPU under accelerate


def test_no_quantization_passes_no_config(captured_load, monkeypatch):
    import policies

    checkpoint, calls = captured_load
    policies.load(str(checkpoint))
    assert "quantization_config" not in calls[0] and "device_map" not in calls[0]


def test_load_policy_prepares_for_kbit_training(captured_load, monkeypatch, tmp_path):
    from alignment.stages import common

    checkpoint, calls = captured_load
    fake_machine(monkeypatch, cuda=True, packages=("bitsandbytes",))
    recipe = recipes.load(write(tmp_path, QLORA), [f"model.name_or_path={checkpoint}"])
    model, _ = common.load_policy(recipe)
    assert calls[0]["quantization_config"].load_in_4bit
    assert not any(p.requires_grad for p in model.parameters())  # the base is frozen; LoRA comes next
    assert model.is_gradient_checkpointing


# ----------------------------------------------------------------------------- saving a QLoRA run


def test_qlora_adapter_merges_into_full_precision_base():
    """A quantized run is saved merged into the base reloaded unquantized: the same weights as a plain merge."""
    from peft import LoraConfig, get_peft_model

    import policies
    from alignment.checkpoint import merged_lora
    from alignment.recipe import LoraSpec, ModelSpec

    base, _ = policies.load("tiny:1m", seed=3)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    model.base_model.model.is_loaded_in_4bit = True  # what a bitsandbytes load sets
    recipe = SimpleNamespace(model=ModelSpec(name_or_path="tiny:1m", lora=LoraSpec(r=4)), seed=3)
    merged = merged_lora(model, recipe)
    assert not getattr(merged, "is_loaded_in_4bit", False)
    state = merged.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor)


# ----------------------------------------------------------------------------- vLLM


def grpo_recipe(*overrides):
    return recipes.load("recipes/tiny/grpo.yaml", ["train.use_vllm=true", *overrides])


def test_use_vllm_without_cuda_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from alignment.stages import online_rl

    fake_machine(monkeypatch, cuda=False, packages=("vllm",))
    with pytest.raises(RecipeError, match=r"train\.use_vllm: vLLM generates on CUDA GPUs; this machine has none"):
        online_rl.run(grpo_recipe(f"output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_use_vllm_without_the_package_says_how_to_install(monkeypatch, stage):
    from alignment.stages import common

    fake_machine(monkeypatch, cuda=True, packages=("bitsandbytes",))
    recipe = recipes.load(f"recipes/tiny/{stage}.yaml", ["train.use_vllm=true"])
    with pytest.raises(RecipeError, match=r"train\.use_vllm: the vllm package is not installed: "
                                          r"pip install -e '\.\[gpu\]'"):
        common.check_vllm(recipe)


def test_use_vllm_with_gpu_and_package_is_handed_to_trl(monkeypatch):
    from trl import GRPOConfig

    from alignment.stages import common

    fake_machine(monkeypatch, cuda=True, packages=("vllm",))
    recipe = grpo_recipe()
    common.check_vllm(recipe)
    assert recipe.train["use_vllm"] is True
    assert "use_vllm" in recipes.config_fields(GRPOConfig)


def test_ppo_use_vllm_reaches_ppo_config_and_is_refused_without_cuda(tmp_path, monkeypatch):
    from alignment.stages import ppo

    recipe = recipes.load("recipes/tiny/ppo_rule.yaml", [  # validation is offline, as for grpo
        "train.use_vllm=true", "train.vllm_mode=server", "train.vllm_server_base_url=http://localhost:8000",
        f"output_dir={tmp_path / 'run'}"])
    config = ppo.build_config(recipe)
    assert config.use_vllm is True and config.vllm_mode == "server"
    assert config.vllm_server_base_url == "http://localhost:8000"
    fake_machine(monkeypatch, cuda=False, packages=("vllm",))
    with pytest.raises(RecipeError, match=r"train\.use_vllm: vLLM generates on CUDA GPUs; this machine has none"):
        ppo.run(recipe)
    assert not (tmp_path / "run").exists()


def test_ppo_bad_vllm_setting_is_a_recipe_error_naming_the_key():
    """Refused when the recipe loads (PPOConfig is built there), at the key, not first when the stage runs."""
    with pytest.raises(RecipeError, match=r"train\.vllm_mode: PPOConfig\.vllm_mode must be one"):
        recipes.load("recipes/tiny/ppo_rule.yaml", ["train.use_vllm=true", "train.vllm_mode=remote"])


def test_ppo_qlora_with_a_policy_copy_critic_is_refused():
    from alignment.stages import ppo

    recipe = recipes.load("recipes/tiny/ppo_rule.yaml", [
        "model.name_or_path=some-org/some-model", "model.lora={r: 8}", "model.quantization=4bit",
        "options.critic=separate"])
    with pytest.raises(RecipeError, match="options.critic: separate copies the policy"):
        ppo.check_options(recipe)


def test_reward_model_quantization_is_refused_for_now(tmp_path):
    text = QLORA.replace("stage: sft", "stage: reward_model").replace("sft.jsonl", "preference.jsonl")
    with pytest.raises(RecipeError, match=r"model\.quantization: not supported for the reward_model stage yet"):
        recipes.load(write(tmp_path, text))
