"""One prompt pass per group of samples (train.share_prompt, train.share_prefill) computes what the padded
passes compute: the same logits, loss and gradients in float64, the same sampled tokens, the same step."""


import pytest
import torch

from alignment.ppo.packing import pack_prompt_groups, prompt_groups, shared_prompt_forward
from alignment.ppo.rollout import generate_responses, response_forward, shared_prefill_cache

from .conftest import grpo_trainer, make_llama


@pytest.fixture
def exact_double(monkeypatch):
    """Pure float64 arithmetic: transformers computes RMSNorm and the eager softmax in float32 even for a
    float64 model, and float32 rounding of a prompt gradient summed over the group vs summed row by row
    (~1e-7) would hide a real error at the tolerance used here."""
    import transformers.models.llama.modeling_llama as llama

    def rms_norm(self, hidden):
        return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda x, dim=None, dtype=None, **_: softmax(x, dim=dim))


def grouped_batch():
    """Six rows in shuffled order (as an update's minibatch is): prompt A = [2, 3, 4] (rows 0, 3, 5),
    B = [2, 5] (rows 1, 4), C = [2, 6, 7, 8] (row 2, alone); responses of 1-4 tokens (EOS = 1)."""
    a, b, c = [2, 3, 4], [2, 5], [2, 6, 7, 8]
    prompts = [a, b, c, a, b, a]
    responses = [[5, 1], [6, 7, 8, 1], [1], [3, 3, 1], [4], [7, 8, 9, 10]]
    q_width, r_width = 4, 4
    query = torch.zeros(6, q_width, dtype=torch.long)
    query_mask = torch.zeros(6, q_width, dtype=torch.long)
    response = torch.zeros(6, r_width, dtype=torch.long)
    response_mask = torch.zeros(6, r_width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        query[i, q_width - len(p):], query_mask[i, q_width - len(p):] = torch.tensor(p), 1
        response[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), True
    return query, query_mask, response, response_mask


def test_prompt_groups_numbers_groups_by_first_appearance():
    query, query_mask, _, _ = grouped_batch()
    first, group = prompt_groups(query, query_mask)
    assert first.tolist() == [0, 1, 2] and group.tolist() == [0, 1, 2, 0, 1, 0]
    # the same real tokens at other columns (more left padding) are another prompt: positions would differ
    assert prompt_groups(torch.tensor([[0, 5], [5, 0]]), torch.tensor([[0, 1], [1, 0]]))[1].tolist() == [0, 1]


def test_pack_prompt_groups_layout_by_hand():
    packed = pack_prompt_groups(*grouped_batch(), pad_token_id=0)
    # group A: [2 3 4 | 5 1 | 3 3 1 | 7 8 9 10] = 3 + 2 + 3 + 4 = 12 tokens; B: [2 5 | 6 7 8 1 | 4] = 7; C: 4 + 1 = 5
    assert packed.input_ids.shape == (3, 12) and packed.packed_tokens == 24
    assert packed.original_tokens == (3 + 2) + (2 + 4) + (4 + 1) + (3 + 3) + (2 + 1) + (3 + 4) == 32
    assert packed.input_ids[0].tolist() == [2, 3, 4, 5, 1, 3, 3, 1, 7, 8, 9, 10]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 3, 4, 5, 6]  # each response from q = 3
    assert packed.segment[1].tolist() == [0, 0, 1, 1, 1, 1, 2] + [-1] * 5
    assert packed.row.tolist() == [0, 1, 2, 0, 1, 0]
    # row 3 (A's second response, packed at 5..7): token 0 from the prompt's last position 2, then 5, 6
    assert packed.logit_index[3].tolist() == [2, 5, 6, 0]
    assert packed.logit_index[2].tolist() == [3, 0, 0, 0]  # C: one token, predicted by its prompt's last
    assert packed.logit_index[5].tolist() == [2, 8, 9, 10]


def test_no_repeated_prompt_is_left_to_the_padded_pass(tokenizer):
    query, query_mask, response, response_mask = grouped_batch()
    rows = [0, 1, 2]  # one row of each prompt
    assert pack_prompt_groups(query[rows], query_mask[rows], response[rows], response_mask[rows], 0) is None
    model = make_llama(tokenizer)
    assert shared_prompt_forward(model, query[rows], query_mask[rows], response[rows], response_mask[rows]) is None
    model.config._attn_implementation = "flash_attention_2"  # takes no 4-D mask: padded pass
    assert shared_prompt_forward(model, *grouped_batch()) is None


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_forward_equals_padded_logits_and_gradients_float64(tokenizer, attention, exact_double):
    model = make_llama(tokenizer, seed=3).double()
    model.config._attn_implementation = attention
    args = grouped_batch()
    mask = args[3]
    weights = torch.randn(*mask.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss_and_grads(forward):
        model.zero_grad()
        logits, _ = forward(model, *args)
        logp = torch.log_softmax(logits, -1).gather(-1, args[2].unsqueeze(-1)).squeeze(-1)
        loss = torch.where(mask, logp * weights, torch.zeros_like(logp)).sum()
        loss.backward()
        return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_logits, padded_loss, padded_grads = loss_and_grads(response_forward)
    shared_logits, shared_loss, shared_grads = loss_and_grads(shared_prompt_forward)
    assert torch.allclose(shared_logits[mask], padded_logits[mask], rtol=0, atol=1e-12)
    assert (shared_logits[~mask] == 0).all()  # past the EOS: nothing, so no gradient either
    assert torch.allclose(shared_loss, padded_loss, rtol=0, atol=1e-12)
    for name, grad in padded_grads.items():
        assert torch.allclose(shared_grads[name], grad, rtol=0, atol=1e-12), name
    assert max(g.abs().max().item() for g in padded_grads.values()) > 1e-3  # the gradients are not all zero


def test_shared_prefill_cache_equals_the_full_prefill_and_samples_the_same_tokens(tokenizer, exact_double):
    model = make_llama(tokenizer, seed=5).double().eval()
    query, query_mask, _, _ = grouped_batch()
    cache = shared_prefill_cache(model, query, query_mask)
    positions = (query_mask.cumsum(-1) - 1).masked_fill(query_mask == 0, 1)
    with torch.no_grad():
        full = model(input_ids=query[:, :-1], attention_mask=query_mask[:, :-1], position_ids=positions[:, :-1],
                     use_cache=True).cache
    real = query_mask[:, :-1].bool()  # pad columns hold keys that the mask hides
    for shared_layer, full_layer in zip(cache.layers, full.layers):
        assert shared_layer.keys.shape == full_layer.keys.shape  # one cache row per batch row
        for got, want in ((shared_layer.keys, full_layer.keys), (shared_layer.values, full_layer.values)):
            assert torch.allclose(got.transpose(1, 2)[real], want.transpose(1, 2)[real], rtol=0, atol=1e-12)

    widths = []  # (rows, columns) of every forward: shows whether generate really started from the cache
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)

    def sample(share):
        torch.manual_seed(7)
        widths.clear()
        out = generate_responses(model, query, query_mask, max_new_tokens=6, temperature=1.0, eos_token_ids=[1],
                                 pad_token_id=0, share_prefill=share)
        return out, widths[:2]

    (plain, plain_calls), (shared, shared_calls) = sample(False), sample(True)
    assert plain_calls[0] == (6, 4)  # generate's own prefill: every row, every prompt column
    assert shared_calls == [(3, 3), (6, 1)]  # 3 prompts x 3 columns once, then only the last column per row
    assert torch.equal(plain, shared)
    assert len({tuple(r) for r in plain[[0, 3, 5]].tolist()}) > 1  # A's rows drew different samples


def test_a_grpo_step_with_shared_prompts_equals_the_padded_step(tokenizer, monkeypatch):
    from alignment.ppo import packing

    calls = []
    original = packing.pack_prompt_groups
    monkeypatch.setattr(packing, "pack_prompt_groups", lambda *a, **k: calls.append(1) or original(*a, **k))

    def run(share):
        trainer = grpo_trainer(tokenizer, kl_in="loss", kl_estimator="k3", kl_coef=0.04, share_prompt=share,
                               share_prefill=share)
        history = trainer.train(2)
        return history, {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}

    plain_history, plain = run(False)
    assert not calls
    shared_history, shared = run(True)
    assert len(calls) == 4  # 2 steps x (reference pass + update pass)
    for key in ("policy/loss", "policy/kl_loss", "objective/kl", "objective/score"):
        assert shared_history[-1][key] == pytest.approx(plain_history[-1][key], abs=1e-5), key
    assert any(not torch.equal(v, make_llama(tokenizer, seed=0).state_dict()[k]) for k, v in plain.items())
    for name, value in plain.items():
        assert torch.allclose(shared[name], value, atol=1e-5), name
