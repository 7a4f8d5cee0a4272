"""Rollout: left padding, sampling settings, truncation at EOS, score placement, log-probs, scoring."""

import copy

import pytest
import torch

from alignment.errors import RewardError
from alignment.ppo.losses import logprobs_from_logits, per_token_rewards, place_score_at_last_token
from alignment.ppo.rollout import (
    collect_rollout,
    generate_responses,
    left_pad_prompts,
    response_forward,
    score_responses,
    stop_token_ids,
    truncate_after_eos,
)
from tests.float_noise import FLOAT32_LOGPROB_NOISE

from .conftest import make_llama, make_seq_critic, make_tokenizer

EOS, PAD = 1, 0


def test_truncate_after_first_eos_mask_includes_eos():
    raw = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, 4, 4, 4], [9, 9, EOS, PAD]])
    ids, mask, has_eos = truncate_after_eos(raw, [EOS], PAD)
    assert torch.equal(
        ids, torch.tensor([[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD], [9, 9, EOS, PAD]])
    )
    assert torch.equal(
        mask.int(), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.int)
    )
    assert has_eos.tolist() == [True, False, True, True]
    # several stop tokens: the first of any of them ends the response
    ids, mask, has_eos = truncate_after_eos(torch.tensor([[5, 9, EOS, 7]]), [EOS, 9], PAD)
    assert ids.tolist() == [[5, 9, PAD, PAD]] and mask.sum().item() == 2


def test_score_lands_on_eos_for_right_and_left_padded_responses():
    raw = torch.tensor([[5, EOS, 7, 7], [6, 6, 6, EOS], [EOS, 3, 3, 3]])
    ids, mask, _ = truncate_after_eos(raw, [EOS], PAD)
    scores = torch.tensor([1.0, 2.0, 3.0])
    zeros = torch.zeros(ids.shape)
    rewards = per_token_rewards(scores, zeros, zeros, mask, beta=0.1)  # KL 0: only the score remains
    # right padded: the score sits exactly on each EOS token, nowhere else
    assert torch.equal(rewards != 0, ids == EOS)
    assert rewards[ids == EOS].tolist() == [1.0, 2.0, 3.0]
    # the same responses left padded (real tokens moved to the right end)
    lengths = mask.sum(-1)
    left_ids = torch.full_like(ids, PAD)
    left_mask = torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, -n:] = ids[i, :n]
        left_mask[i, -n:] = True
    placed = place_score_at_last_token(scores, left_mask)
    assert torch.equal(placed != 0, left_ids == EOS)
    assert placed[left_ids == EOS].tolist() == [1.0, 2.0, 3.0]


def _bos_tokenizer():
    from tokenizers import processors

    tok = make_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 2)]
    )
    return tok


def test_left_pad_prompts_and_no_double_bos():
    tok = _bos_tokenizer()
    ids, mask = left_pad_prompts(tok, ["a b c", "d", "<s> e"])
    # "a b c" -> <s> a b c = [2, 3, 4, 5]; "d" -> [2, 6] left padded; "<s> e" already has BOS -> [2, 7]
    assert ids.tolist() == [[2, 3, 4, 5], [PAD, PAD, 2, 6], [PAD, PAD, 2, 7]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_pad_equal_to_eos_is_refused():
    from transformers import PreTrainedTokenizerFast

    tok = make_tokenizer()
    same = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, pad_token="</s>", eos_token="</s>")
    with pytest.raises(ValueError, match="pad"):
        stop_token_ids(same)
    assert stop_token_ids(tok) == [EOS]


def test_generation_ignores_the_models_own_sampling_settings(tokenizer):
    lm = make_llama(tokenizer)
    ids, mask = left_pad_prompts(tokenizer, ["a b"] * 64)

    def sample():
        torch.manual_seed(0)
        return generate_responses(
            lm, ids, mask, max_new_tokens=3, temperature=1.0, eos_token_ids=[EOS], pad_token_id=PAD
        )

    before = sample()
    assert before.shape[1] <= 3
    lm.generation_config.top_p = 0.05
    lm.generation_config.repetition_penalty = 5.0
    lm.generation_config.suppress_tokens = [3, 4]
    after = sample()
    assert torch.equal(before, after)
    assert lm.generation_config.repetition_penalty == 5.0  # restored afterwards
    assert len(set(before[:, 0].tolist())) > 3  # pure sampling: many different first tokens


def test_response_forward_only_projects_response_positions(tokenizer):
    lm = make_llama(tokenizer).eval()
    q_ids, q_mask = left_pad_prompts(tokenizer, ["a b c", "d"])
    r_ids = torch.tensor([[5, 6, EOS], [7, EOS, PAD]])
    r_mask = r_ids != PAD
    logits, values = response_forward(lm, q_ids, q_mask, r_ids, r_mask)
    assert values is None and logits.shape == (2, 3, len(tokenizer))
    full_ids = torch.cat([q_ids, r_ids], 1)
    full_mask = torch.cat([q_mask, r_mask.long()], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    full = lm(full_ids, attention_mask=full_mask, position_ids=positions).logits
    # logits at prompt_len-1 .. end-1 predict the response tokens
    assert torch.allclose(logits, full[:, q_ids.shape[1] - 1 : -1], atol=1e-5)


def test_collect_rollout_eval_mode_and_exact_reference(tokenizer):
    policy = make_llama(tokenizer, dropout=0.5).train()  # dropout > 0, left in train mode by the caller
    ref = copy.deepcopy(policy)
    critic = make_seq_critic(tokenizer).train()
    torch.manual_seed(0)
    rollout = collect_rollout(
        policy,
        ref,
        critic,
        tokenizer,
        ["a b", "c", "d e f", "g"] * 2,
        max_new_tokens=5,
        temperature=0.7,
        forward_batch_size=3,
    )
    assert not policy.training and not ref.training and not critic.training
    # KL 0 within float noise (a copy may sit at other addresses, and MKL's kernels can round by alignment);
    # dropout left on would move it by far more
    assert torch.allclose(rollout.logprobs, rollout.ref_logprobs, rtol=0, atol=FLOAT32_LOGPROB_NOISE)
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        tensor = getattr(rollout, name)
        assert tensor.shape == rollout.response_ids.shape and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all() and (tensor[~rollout.response_mask] == 0).all(), name
    assert (rollout.logprobs[rollout.response_mask] < 0).all()
    # log-probs at temperature 0.7 match a full forward pass divided by 0.7
    logits, _ = response_forward(
        policy, rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask
    )
    expected = logprobs_from_logits(logits, rollout.response_ids, 0.7)
    assert torch.allclose(rollout.logprobs, torch.where(rollout.response_mask, expected, 0.0), atol=1e-6)
    for text, ids, mask in zip(rollout.completions, rollout.response_ids, rollout.response_mask):
        assert text == tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)


def test_score_responses_validation():
    def fn(prompts, completions, bonus):
        return [1.0, None, 2]

    assert score_responses(fn, ["p"] * 3, ["a", "b", "c"], {"bonus": [0, 0, 0]}) == [1.0, None, 2.0]

    def nan_fn(prompts, completions):
        return [1.0, float("nan")]

    with pytest.raises(RewardError, match="nan_fn.*sample 1"):
        score_responses(nan_fn, ["p", "p"], ["a", "b"], {})
    with pytest.raises(RewardError, match="2 scores for 3"):
        score_responses(lambda p, c: [1.0, 2.0], ["p"] * 3, ["a"] * 3, {})
    with pytest.raises(RewardError, match="not a number"):
        score_responses(lambda p, c: ["1.0"], ["p"], ["a"], {})

    def broken(prompts, completions):
        raise ConnectionError("scorer down")

    with pytest.raises(RewardError, match="broken.*scorer down"):
        score_responses(broken, ["p"], ["a"], {})
