"""PPO with `use_vllm` (alignment.ppo.vllm_rollout), on CPU without vllm: the refusals, the config keys, and
the sampler and trainer with a stand-in for trl's VLLMGeneration (nothing here runs vLLM itself)."""

import copy
import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from alignment.ppo import PPOConfig, PPOTrainer, vllm_rollout
from alignment.ppo import trainer as trainer_module
from alignment.ppo.rollout import generate_responses, left_pad_prompts, truncate_after_eos
from policies.value import CausalLMWithValueHead

from .conftest import make_llama, make_seq_critic

load_module = importlib.import_module("policies.load")  # `policies.load` the attribute is the function

PROMPTS = [{"prompt": p} for p in ["a b", "c d e", "f", "g h a b"]]


def count_a(prompts, completions):
    return [float(c.split().count("a")) for c in completions]


def vllm_config(**overrides):
    values = dict(learning_rate=1e-3, batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=5,
                  temperature=0.7, total_steps=10, seed=0, use_vllm=True)
    values.update(overrides)
    return PPOConfig(**values)


def fake_machine(monkeypatch, *, cuda: bool, packages=()) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(load_module, "package_available", lambda name: name in packages)


class FakeGeneration:
    """Stands in for trl's VLLMGeneration: an engine holding its own copy of the weights (as vLLM does),
    refreshed by `sync_weights`, sampling with transformers; or returning `fixed` token lists."""

    instances: list = []
    fixed = None

    def __init__(self, model, accelerator, processing_class, **kwargs):
        self.model, self.kwargs, self.tokenizer = model, kwargs, processing_class
        self.engine = copy.deepcopy(model)  # the weights vLLM loaded at start
        self.events, self.prompts, self.engine_was_current = [], [], []
        FakeGeneration.instances.append(self)

    def sync_weights(self):
        self.events.append("sync")
        self.engine.load_state_dict(self.model.state_dict())

    def generate(self, prompts, images, num_generations):
        assert images is None and num_generations == 1
        self.events.append("generate")
        self.prompts.append([list(p) for p in prompts])
        current = self.model.state_dict()
        self.engine_was_current.append(all(torch.equal(v, current[k]) for k, v in self.engine.state_dict().items()))
        if self.fixed is not None:
            completions = [list(c) for c in self.fixed]
        else:
            completions = hf_completions(self.engine, self.tokenizer, prompts, self.kwargs)
        return [list(p) for p in prompts], completions, None, None


def hf_completions(model, tokenizer, prompts, kwargs):
    """Sample with transformers from unpadded token lists; each completion ends at its first EOS (as vLLM's)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    raw = generate_responses(model, ids, mask, max_new_tokens=kwargs["max_completion_length"],
                             temperature=kwargs["temperature"], eos_token_ids=kwargs["generation_kwargs"]["stop_token_ids"],
                             pad_token_id=tokenizer.pad_token_id)
    eos = set(kwargs["generation_kwargs"]["stop_token_ids"])
    completions = []
    for row in raw.tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        completions.append(row[:cut])
    return completions


@pytest.fixture
def stand_in(monkeypatch):
    FakeGeneration.instances, FakeGeneration.fixed = [], None
    monkeypatch.setattr(vllm_rollout, "VLLMGeneration", FakeGeneration)
    return FakeGeneration


@pytest.fixture
def fake_vllm(stand_in, monkeypatch):
    monkeypatch.setattr(vllm_rollout, "vllm_problem", lambda: None)  # as on a GPU machine with vllm
    return stand_in


def named_llama(tokenizer, seed=0):
    lm = make_llama(tokenizer, seed=seed)
    lm.name_or_path = "stand-in/tiny"  # colocate vLLM loads the starting weights from here
    return lm


# ------------------------------------------------------------------ config and refusals


def test_config_takes_the_vllm_keys():
    cfg = vllm_config(vllm_mode="server", vllm_server_base_url="http://localhost:8000", vllm_max_model_length=256)
    assert cfg.use_vllm and cfg.vllm_mode == "server" and cfg.vllm_max_model_length == 256
    assert PPOConfig().use_vllm is False and PPOConfig().vllm_gpu_memory_utilization == 0.3
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vllm_mode": "remote"}, r"PPOConfig\.vllm_mode must be one of \('colocate', 'server'\)"),
        ({"vllm_gpu_memory_utilization": 0}, r"PPOConfig\.vllm_gpu_memory_utilization must be in \(0, 1\]"),
        ({"vllm_gpu_memory_utilization": 1.5}, r"PPOConfig\.vllm_gpu_memory_utilization"),
        ({"vllm_server_base_url": "localhost:8000", "vllm_mode": "server"}, r"PPOConfig\.vllm_server_base_url must"),
        ({"vllm_server_base_url": "http://h:8000"}, r"vllm_server_base_url is set but vllm_mode is 'colocate'"),
        ({"vllm_max_model_length": 0}, r"PPOConfig\.vllm_max_model_length"),
        ({"use_vllm": "yes"}, r"PPOConfig\.use_vllm must be true or false"),
        ({"generation_chunk_size": 4}, r"generation_chunk_size .* cannot be combined with use_vllm"),
    ],
)
def test_bad_vllm_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        vllm_config(**overrides)


def _never(*args, **kwargs):
    raise AssertionError("reached model set-up: the refusal must come first")


@pytest.mark.parametrize(
    "cuda, packages, message",
    [
        (False, ("vllm",), r"train\.use_vllm.*: vLLM generates on CUDA GPUs; this machine has none"),
        (True, (), r"train\.use_vllm.*: the vllm package is not installed: pip install -e '\.\[gpu\]'"),
    ],
)
def test_trainer_refuses_use_vllm_before_any_model_work(tokenizer, monkeypatch, stand_in, cuda, packages, message):
    fake_machine(monkeypatch, cuda=cuda, packages=packages)
    monkeypatch.setattr(trainer_module, "make_accelerator", _never)
    lm = named_llama(tokenizer)
    with pytest.raises(ValueError, match=message):
        PPOTrainer(vllm_config(), lm, copy.deepcopy(lm), make_seq_critic(tokenizer), tokenizer, count_a, PROMPTS)
    assert stand_in.instances == []


def test_colocate_refuses_a_model_with_no_path(tokenizer, fake_vllm):
    lm = make_llama(tokenizer)
    assert not lm.name_or_path
    with pytest.raises(ValueError, match=r"use_vllm with vllm_mode 'colocate'.*name_or_path, which is empty"):
        vllm_rollout.VLLMSampler(vllm_config(), lm, SimpleNamespace(), tokenizer)
    vllm_rollout.VLLMSampler(vllm_config(vllm_mode="server"), lm, SimpleNamespace(), tokenizer)  # server: fine


# ------------------------------------------------------------------ the sampler


def test_sampler_settings_unpadded_prompts_and_right_padded_responses(tokenizer, fake_vllm):
    cfg = vllm_config(temperature=0.9, max_new_tokens=5, vllm_gpu_memory_utilization=0.25)
    sampler = vllm_rollout.VLLMSampler(cfg, CausalLMWithValueHead(named_llama(tokenizer)), SimpleNamespace(), tokenizer)
    engine = fake_vllm.instances[0]
    assert type(engine.model).__name__ == "LlamaForCausalLM"  # the language model, not the value-head wrapper
    k = engine.kwargs
    assert (k["mode"], k["gpu_memory_utilization"], k["temperature"], k["top_p"], k["top_k"], k["min_p"],
            k["repetition_penalty"], k["max_completion_length"]) == ("colocate", 0.25, 0.9, 1.0, 0, 0.0, 1.0, 5)
    assert k["generation_kwargs"] == {"stop_token_ids": [tokenizer.eos_token_id]}

    query_ids, query_mask = left_pad_prompts(tokenizer, ["a b", "c d e f", "g"])
    assert (query_mask == 0).any()  # the batch really is left-padded
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    fake_vllm.fixed = [[3, eos], [4, 5, 6, 7, 8], [eos]]
    response = sampler.sample(query_ids, query_mask)
    assert engine.prompts == [[tokenizer(p)["input_ids"] for p in ["a b", "c d e f", "g"]]]
    assert engine.prompts[0][0][-2:] == [3, 4] and pad not in engine.prompts[0][0]
    assert response.tolist() == [[3, eos, pad, pad, pad], [4, 5, 6, 7, 8], [eos, pad, pad, pad, pad]]

    fake_vllm.fixed = [[3, eos], [eos], [5, 6, eos]]  # every response stopped early: narrower than max_new_tokens
    assert sampler.sample(query_ids, query_mask).tolist() == [[3, eos, pad], [eos, pad, pad], [5, 6, eos]]


def test_eos_masks_match_the_hf_path(tokenizer, fake_vllm):
    cfg = vllm_config(temperature=1.0, max_new_tokens=6)
    lm = named_llama(tokenizer, seed=3)
    sampler = vllm_rollout.VLLMSampler(cfg, lm, SimpleNamespace(), tokenizer)
    prompts = ["a b", "c d e", "f", "g h a b", "b", "c c", "d e f g", "h"] * 2
    query_ids, query_mask = left_pad_prompts(tokenizer, prompts)
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id

    torch.manual_seed(11)
    hf = truncate_after_eos(generate_responses(lm, query_ids, query_mask, max_new_tokens=6, temperature=1.0,
                                               eos_token_ids=eos, pad_token_id=pad), eos, pad)
    torch.manual_seed(11)  # the stand-in samples the same tokens from the unpadded prompts
    ours = truncate_after_eos(sampler.sample(query_ids, query_mask), eos, pad)
    assert hf[2].any() and not hf[2].all()  # responses with and without an EOS
    for a, b in zip(hf, ours):
        assert torch.equal(a, b)


def test_a_short_response_without_eos_is_an_error_not_padding(tokenizer, fake_vllm):
    sampler = vllm_rollout.VLLMSampler(vllm_config(max_new_tokens=5), named_llama(tokenizer), SimpleNamespace(),
                                       tokenizer)
    query_ids, query_mask = left_pad_prompts(tokenizer, ["a b", "c"])
    fake_vllm.fixed = [[3, tokenizer.eos_token_id], [4, 5]]
    with pytest.raises(RuntimeError, match=r"after 2 tokens with no EOS.*vllm_max_model_length"):
        sampler.sample(query_ids, query_mask)


# ------------------------------------------------------------------ the trainer


def test_ppo_run_with_the_stand_in_syncs_once_per_step_before_sampling(tokenizer, fake_vllm):
    lm = named_llama(tokenizer)
    policy = CausalLMWithValueHead(lm)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    trainer = PPOTrainer(vllm_config(), policy, copy.deepcopy(lm), None, tokenizer, count_a, PROMPTS)
    engine = fake_vllm.instances[0]
    assert engine.model is lm and engine.events == []
    history = trainer.train(2)
    assert engine.events == ["sync", "generate", "sync", "generate"]
    assert engine.engine_was_current == [True, True]  # each rollout sampled the weights of that step
    for metrics in history:
        assert math.isfinite(metrics["policy/loss"]) and math.isfinite(metrics["value/loss"])
    after = lm.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    sampled = trainer.last_rollout
    assert sampled.response_ids.shape[0] == 8 and sampled.response_ids.shape[1] <= 5
