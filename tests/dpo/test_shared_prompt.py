"""The shared-prompt packing (alignment/shared_prompt.py): hand-worked layouts, exact equality with the unshared
forward and its gradients, the cases it must leave alone, and the DPO stage with it on and off."""

import copy
import json

import pytest
import torch

from alignment import shared_prompt as sp


def batch(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def test_pack_pairs_by_hand():
    # pair 0: prompt [5 6 7], chosen tail [8 9], rejected tail [4]; pair 1 shares only [5]: tails [1] and [2 3]
    ids, mask = batch([[5, 6, 7, 8, 9], [5, 1], [5, 6, 7, 4], [5, 2, 3]])
    packed = sp.pack_pairs(ids, mask, pad_token_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 4], [5, 1, 2, 3, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 0, 0]]
    assert packed.segment.tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, -1, -1]]
    # the way back: row 2 (pair 0, rejected) = packed positions 0 1 2 5; row 3 = 0 2 3; padding reads position 0
    assert packed.source.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 0, 0], [0, 1, 2, 5, 0], [0, 2, 3, 0, 0]]
    assert (packed.packed_tokens, packed.original_tokens) == (10, 14)


def test_pair_mask_by_hand():
    segment = torch.tensor([[0, 0, 1, 2, 2, -1]])
    allowed = sp.segment_attention_mask(segment)[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # chosen tail: prefix + itself
        [1, 1, 0, 1, 0, 0],  # rejected tail: prefix + itself, never the chosen tail
        [1, 1, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 0],  # padding query: the prefix (or position 0), so no row is fully masked
    ]
    additive = sp.segment_attention_mask(segment, additive_dtype=torch.float32)[0, 0]
    assert additive[3, 2] == torch.finfo(torch.float32).min and additive[3, 1] == 0


def test_pack_groups_by_hand():
    # prompt columns 0-2 (left padded), completion columns 3-5 (right padded); rows 0 and 2 share prompt [5 6]
    ids = torch.tensor([[0, 5, 6, 7, 8, 0], [4, 5, 6, 1, 2, 3], [0, 5, 6, 9, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    packed = sp.pack_groups(ids, mask, prompt_width=3)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [4, 5, 6, 1, 2, 3]]
    assert packed.position_ids.tolist() == [[1, 2, 3, 4, 3, 0], [0, 1, 2, 3, 4, 5]], "the unpacked columns"
    assert packed.segment.tolist() == [[0, 0, 1, 1, 2, -1], [0, 0, 0, 1, 1, 1]]
    assert packed.packed_row.tolist() == [0, 1, 0]
    assert packed.source.tolist() == [[0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 4, 0, 0]]
    assert (packed.packed_tokens, packed.original_tokens) == (11, 13)
    assert sp.pack_groups(ids[:2], mask[:2], prompt_width=3) is None, "no prompt repeats: nothing to share"


def test_pack_common_prefix_by_hand():
    # every row starts with [5 6]; rows packed two at a time
    ids, mask = batch([[5, 6, 7, 8], [5, 6, 9], [5, 6, 1, 2, 3]])
    packed = sp.pack_common_prefix(ids, mask, group_size=2)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 1, 2, 3]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 4]]
    assert packed.segment.tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 1]]
    assert packed.packed_row.tolist() == [0, 0, 1]
    assert packed.source.tolist() == [[0, 1, 2, 3, 0], [0, 1, 4, 0, 0], [0, 1, 2, 3, 4]]
    assert (packed.packed_tokens, packed.original_tokens) == (10, 12)
    ids, mask = batch([[5, 6, 7, 8, 1, 2], [5, 9, 9, 9, 9, 9]])
    assert sp.pack_common_prefix(ids, mask, group_size=2) is None, "a 1-token prefix saves under 10%"


def test_pack_pairs_refuses_what_it_does_not_cover():
    ids, mask = batch([[5, 6, 7], [5, 6, 8], [5, 9, 9]])
    assert sp.pack_pairs(ids, mask) is None, "an odd number of rows is not pairs"
    ids, mask = batch([[5, 6, 7], [5, 6, 8]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert sp.pack_pairs(ids, left) is None, "left padding"


@pytest.fixture
def exact_double(monkeypatch):
    """Pure float64 arithmetic: transformers computes RMSNorm and eager softmax in float32 even for a float64
    model, and float32 rounding of (a + b) vs a, b (how the prefix gradient sums) would hide a real error."""
    import transformers.models.llama.modeling_llama as llama

    def rms_norm(self, hidden):
        return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda x, dim=None, dtype=None, **_: softmax(x, dim=dim))


def pair_rows(generator):
    """Four pairs: long and short prompts, tails of 0-4 tokens, one pair sharing the answer's first token."""
    def draw(n):
        return torch.randint(3, 250, (n,), generator=generator).tolist()

    prompts = [draw(n) for n in (6, 2, 9, 1)]
    chosen = [draw(3), draw(1), draw(4), []]
    rejected = [draw(2), chosen[1] + draw(2), draw(1), draw(3)]
    return [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]


def group_batch(generator, prompt_width=8, completion_width=5):
    """Three prompts (left padded) with 3, 1 and 2 completions (right padded, one empty), rows shuffled."""
    prompts = [torch.randint(3, 250, (n,), generator=generator).tolist() for n in (8, 3, 5)]
    rows = []
    for prompt, lengths in zip(prompts, ([5, 2, 4], [3], [0, 1])):
        for n in lengths:
            rows.append((prompt, torch.randint(3, 250, (n,), generator=generator).tolist()))
    order = torch.randperm(len(rows), generator=generator).tolist()
    ids = torch.zeros(len(rows), prompt_width + completion_width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, j in enumerate(order):
        prompt, completion = rows[j]
        ids[i, prompt_width - len(prompt) : prompt_width] = torch.tensor(prompt)
        mask[i, prompt_width - len(prompt) : prompt_width] = 1
        ids[i, prompt_width : prompt_width + len(completion)] = torch.tensor(completion, dtype=torch.long)
        mask[i, prompt_width : prompt_width + len(completion)] = 1
    return ids, mask


def prefix_rows(generator):
    """Seven rows starting with the same 4 tokens (a chat header), tails of 0-6 tokens."""
    header = torch.randint(3, 250, (4,), generator=generator).tolist()
    return [header + torch.randint(3, 250, (n,), generator=generator).tolist() for n in (6, 1, 3, 0, 5, 2, 4)]


@pytest.mark.parametrize("layout", ["pairs", "groups", "common_prefix"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_forward_and_gradients_equal_the_unshared_ones(attention, layout, exact_double):
    import policies

    model, _ = policies.load("tiny:1m", seed=0)
    model = model.double()
    model.config._attn_implementation = attention
    generator = torch.Generator().manual_seed(0)
    if layout == "pairs":
        ids, mask = batch(pair_rows(generator))
        packing = sp.active()
    elif layout == "groups":
        ids, mask = group_batch(generator)
        packing = sp.active(prompt_width=8)
    else:
        ids, mask = batch(prefix_rows(generator))
        packing = sp.active(group_size=3)
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)

    def hidden_and_grads(packed):
        model.zero_grad()
        with packing if packed else torch.enable_grad():
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        (hidden * weights * mask.unsqueeze(-1)).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_hidden, plain_grads = hidden_and_grads(False)
    assert sp.install(model)
    packed_hidden, packed_grads = hidden_and_grads(True)
    stats = model.model.shared_prompt_stats
    assert stats.packed < stats.original, "the packed call must actually run"
    valid = mask.bool()
    assert torch.allclose(packed_hidden[valid], plain_hidden[valid], rtol=0, atol=1e-12)
    for name, grad in plain_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-10, atol=1e-12), name


def test_outside_active_and_for_other_batches_the_forward_is_untouched():
    import policies

    model, _ = policies.load("tiny:1m", seed=0)
    ids, mask = batch(pair_rows(torch.Generator().manual_seed(2)))
    plain = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert sp.install(model)
    assert torch.equal(model.model(input_ids=ids, attention_mask=mask).last_hidden_state, plain)
    with sp.active():
        odd = model.model(input_ids=ids[:3], attention_mask=mask[:3]).last_hidden_state
        cached = model.model(input_ids=ids, attention_mask=mask, use_cache=True).last_hidden_state
    assert model.model.shared_prompt_stats.original == 0, "no packing outside active(), for an odd batch, or with a KV cache"
    # a batch of 3 and the KV-cache path are other kernels' computations (other blocking on another CPU):
    # equal within float32 rounding; the stats above are what say nothing was packed
    assert torch.allclose(odd, plain[:3], rtol=0, atol=1e-5) and torch.allclose(cached, plain, rtol=0, atol=1e-5)


def test_a_deep_copy_packs_with_its_own_weights():
    """A frozen reference is a deep copy of the policy: its packing forward must run the copy, not the policy."""
    import policies

    model, _ = policies.load("tiny:1m", seed=0)
    assert sp.install(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    ids, mask = batch(pair_rows(torch.Generator().manual_seed(3)))
    with torch.no_grad():
        expected = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        with sp.active():
            packed = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert sp.install(reference), "already installed, bound to the copy"
    assert torch.allclose(packed[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_models_it_cannot_pack_are_named():
    from transformers import LlamaConfig

    config = LlamaConfig()
    config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in sp.unsupported_reason(config)
    config._attn_implementation = "sdpa"
    assert sp.unsupported_reason(config) is None
    config.layer_types = ["full_attention", "sliding_attention"]
    assert "sliding" in sp.unsupported_reason(config)


def run_with_and_without_sharing(stage: str, tmp_path, overrides: list) -> tuple:
    """Run recipes/tiny/<stage>.yaml with options.share_prompt true, then false: (metrics, logged losses) each."""
    import importlib

    from alignment import recipe as recipes

    module = importlib.import_module(f"alignment.stages.{stage}")
    results = []
    for setting in (True, False):
        out = tmp_path / str(setting)
        recipe = recipes.load(f"recipes/tiny/{stage}.yaml", [
            *overrides, "train.logging_steps=1", "train.save_strategy='no'",
            f"options.share_prompt={str(setting).lower()}", f"output_dir={out}"])
        metrics = module.run(recipe)
        logged = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        results.append((metrics, [e["loss"] for e in logged if "loss" in e]))
    (shared, shared_losses), (plain, plain_losses) = results
    assert shared["share_prompt"] is True and plain["share_prompt"] is False
    assert len(shared_losses) == len(plain_losses) == 3
    assert shared_losses == pytest.approx(plain_losses, rel=1e-4), "same numbers, fewer tokens"
    return shared["share_prompt_saved_fraction"]


@pytest.mark.parametrize("reference", [
    ["options.reference=copy"],
    ["options.reference=precomputed"],  # trl's precompute pass before step 1 packs too
    ["options.reference=adapter", "model.lora={r: 4, alpha: 8}"],  # the policy with its adapter off
])
def test_dpo_stage_with_and_without_sharing_trains_the_same(reference, tmp_path):
    saved = run_with_and_without_sharing("dpo", tmp_path, [
        "model.name_or_path=tiny:1m", "data.max_samples=48", "data.eval=null", "eval=null", "options.kl_samples=0",
        "options.evaluate_before=false", "train.max_steps=3", "train.per_device_train_batch_size=8", *reference])
    assert 0.2 < saved < 0.7, "demo prompts are most of each pair"


def test_sft_stage_with_and_without_a_shared_header_trains_the_same(tmp_path):
    """Every demo SFT row starts with the same 6 chat-template tokens: packed 8 rows at a time they run once."""
    saved = run_with_and_without_sharing("sft", tmp_path, [
        "model.name_or_path=tiny:1m", "data.max_samples=64", "eval=null", "options.evaluate_before=false",
        "train.max_steps=3", "train.per_device_train_batch_size=16"])
    assert saved > 0.15, "a 6-token header of ~20-token rows, 8 rows a pack"


def test_outcome_reports_sharing_only_when_a_batch_was_packed():
    """A hooked trainer method that trl stopped calling must not be reported as prompt sharing."""
    import warnings

    import policies

    model, _ = policies.load("tiny:1m", seed=0)
    assert sp.install(model)
    with pytest.warns(RuntimeWarning, match="no batch was packed"):
        assert sp.outcome(True, model) == {"share_prompt": False, "share_prompt_saved_fraction": None}
    ids, mask = batch(pair_rows(torch.Generator().manual_seed(2)))
    with sp.active():
        model.model(input_ids=ids, attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reported = sp.outcome(True, model)
    assert reported["share_prompt"] is True and 0.0 < reported["share_prompt_saved_fraction"] < 1.0
    assert sp.outcome(False, None) == {"share_prompt": False, "share_prompt_saved_fraction": None}
