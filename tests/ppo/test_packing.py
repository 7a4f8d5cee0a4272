"""Packed update passes give the padded pass's logits, loss and gradients (up to float rounding)."""


import pytest
import torch

from alignment.ppo.packing import first_fit_bins, pack_sequences, packed_response_forward
from alignment.ppo.rollout import response_forward

from .conftest import grpo_trainer, make_llama


def test_first_fit_bins_longest_first():
    # capacity 10, lengths [6, 3, 5, 4, 2], taken longest first: 6 (index 0) -> bin 0 (room 4);
    # 5 (index 2) -> bin 1 (room 5); 4 (index 3) -> bin 0 (room 0); 3 (index 1) -> bin 1 (room 2); 2 -> bin 1
    assert first_fit_bins([6, 3, 5, 4, 2], 10) == [[0, 3], [2, 1, 4]]


def batch(tokenizer):
    """Left-padded prompts of 1-4 words, right-padded responses of 1-4 tokens (EOS = 1 at the end)."""
    prompts = [[2, 3], [2, 4, 5, 6, 7], [2, 8], [2, 9, 10, 3]]
    responses = [[4, 1], [5, 6, 7, 1], [1], [8, 9, 1]]
    q_width, r_width = max(map(len, prompts)), max(map(len, responses))
    query = torch.zeros(4, q_width, dtype=torch.long)
    query_mask = torch.zeros(4, q_width, dtype=torch.long)
    response = torch.zeros(4, r_width, dtype=torch.long)
    response_mask = torch.zeros(4, r_width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        query[i, q_width - len(p):], query_mask[i, q_width - len(p):] = torch.tensor(p), 1
        response[i, :len(r)], response_mask[i, :len(r)] = torch.tensor(r), True
    return query, query_mask, response, response_mask


def test_packing_takes_fewer_positions_and_no_row_is_longer(tokenizer):
    packed = pack_sequences(*batch(tokenizer), pad_token_id=0)
    # lengths 4, 9, 3, 7; capacity 5 + 4 = 9: [9], [7], [4, 3] -> 3 rows of 9, against 4 padded rows of 9
    assert packed.input_ids.shape == (3, 9) and packed.packed_positions == 27 and packed.padded_positions == 36
    assert packed.position_ids[2].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_forward_equals_padded_logits_and_gradients(tokenizer, attention):
    model = make_llama(tokenizer, seed=3)
    model.config._attn_implementation = attention
    args = batch(tokenizer)
    mask = args[3]
    weights = torch.randn(*mask.shape, generator=torch.Generator().manual_seed(0))

    def loss_and_grads(forward):
        model.zero_grad()
        logits, _ = forward(model, *args)
        logp = torch.log_softmax(logits, -1).gather(-1, args[2].unsqueeze(-1)).squeeze(-1)
        loss = torch.where(mask, logp * weights, torch.zeros_like(logp)).sum()
        loss.backward()
        return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_logits, padded_loss, padded_grads = loss_and_grads(response_forward)
    packed_logits, packed_loss, packed_grads = loss_and_grads(packed_response_forward)
    assert torch.allclose(packed_logits[mask], padded_logits[mask], atol=1e-5)
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5), name
    assert max(g.abs().max().item() for g in padded_grads.values()) > 1e-3  # the gradients are not all zero


def test_a_packed_ppo_step_equals_the_padded_step(tokenizer, monkeypatch):
    from alignment.ppo import packing

    calls = []
    original = packing.pack_sequences
    monkeypatch.setattr(packing, "pack_sequences", lambda *a, **k: calls.append(1) or original(*a, **k))

    def run(pack):
        trainer = grpo_trainer(tokenizer, mini_batch_size=4, ppo_epochs=2, pack_updates=pack,
                               share_prompt=False)  # pack_updates is the no-sharing path
        trainer.step()
        return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}

    padded = run(False)
    assert not calls
    packed = run(True)
    assert len(calls) == 4  # 2 epochs x 2 micro-batches, every update pass packed
    for name, value in padded.items():
        assert torch.allclose(packed[name], value, atol=1e-5), name
