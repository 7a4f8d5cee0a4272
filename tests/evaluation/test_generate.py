"""Generation, sequence log-probs and text NLL on a tiny random Llama with a character tokenizer."""

import math

import numpy as np
import pytest
import torch

from alignment.errors import DataError
from alignment.evaluation import stats
from alignment.evaluation.generate import (
    _cut_at_eos,
    _encode_prompt,
    completion_nll,
    generate_completions,
    render_prompt,
    sequence_logprobs,
    text_nll,
)

from .conftest import build_tiny_llama

PROMPTS = [
    "What is 2 + 3?",
    [{"role": "user", "content": "What is 12 + 30?"}],
    "Hi",
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 7 + 8?"}],
]


def test_chat_prompts_use_the_template_with_one_bos(tokenizer):
    text = render_prompt(tokenizer, PROMPTS[1])
    assert text == "<s><|im_start|>user\nWhat is 12 + 30?<|im_end|><|im_start|>assistant\n"
    bos = tokenizer.bos_token_id
    assert _encode_prompt(tokenizer, PROMPTS[1]).count(bos) == 1
    assert _encode_prompt(tokenizer, "Hi")[0] == bos  # plain strings get the tokenizer's BOS
    # an already-rendered chat prompt starts with the BOS text: it must not get a second BOS
    assert _encode_prompt(tokenizer, text) == _encode_prompt(tokenizer, PROMPTS[1])
    with pytest.raises(DataError, match="messages"):
        render_prompt(tokenizer, [{"text": "no role"}])


def test_greedy_generation_is_batch_invariant_and_restores_train_mode(model, tokenizer):
    model.train()
    one_by_one = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=1)
    batched = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    assert model.training  # put back as it was
    assert [r["token_ids"] for r in one_by_one] == [r["token_ids"] for r in batched]  # left padding is right
    for r in batched:
        assert set(r) == {"text", "num_tokens", "ended_with_eos", "token_ids", "prompt_text"}
        assert r["num_tokens"] == len(r["token_ids"]) - int(r["ended_with_eos"])
        assert r["num_tokens"] <= 8
    model.eval()


def test_sampling_repeats_with_a_seed_and_leaves_global_rng_alone(model, tokenizer):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    kwargs = dict(max_new_tokens=12, batch_size=2, do_sample=True, temperature=1.5)
    first = generate_completions(model, tokenizer, PROMPTS, seed=5, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)
    again = generate_completions(model, tokenizer, PROMPTS, seed=5, **kwargs)
    other = generate_completions(model, tokenizer, PROMPTS, seed=6, **kwargs)
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other]


def test_cut_at_first_eos():
    assert _cut_at_eos([5, 6, 3, 7, 3], {3}) == ([5, 6, 3], True)
    assert _cut_at_eos([5, 6], {3}) == ([5, 6], False)
    assert _cut_at_eos([9, 5], {3, 9}) == ([9], True)


def test_completions_stop_at_the_first_eos(model, tokenizer):
    # a random model at a high temperature emits the EOS now and then; with this seed, in several rows
    results = generate_completions(
        model,
        tokenizer,
        ["Hi"] * 24,
        max_new_tokens=20,
        batch_size=12,
        do_sample=True,
        temperature=3.0,
        seed=0,
    )
    eos = tokenizer.eos_token_id
    ended = [r for r in results if r["ended_with_eos"]]
    assert 0 < len(ended) < len(results)
    for r in results:
        ids = r["token_ids"]
        assert ids.count(eos) == int(r["ended_with_eos"])
        if r["ended_with_eos"]:
            assert ids[-1] == eos
        else:
            assert len(ids) == 20
        body = ids[:-1] if r["ended_with_eos"] else ids
        assert r["text"] == tokenizer.decode(body, skip_special_tokens=True)
        assert "<|im_end|>" not in r["text"]


def _manual_logprob(model, tokenizer, prompt, completion_ids, temperature=1.0):
    ids = _encode_prompt(tokenizer, prompt) + list(completion_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0] / temperature
    logp = torch.log_softmax(logits, -1)
    start = len(ids) - len(completion_ids)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_sequence_logprobs_match_an_unpadded_forward(model, tokenizer):
    completions = [
        "5",
        "42<|im_end|>",
        [tokenizer.convert_tokens_to_ids("7"), tokenizer.eos_token_id],
        " hello",
    ]
    for temperature in (1.0, 2.0):
        got = sequence_logprobs(model, tokenizer, PROMPTS, completions, temperature=temperature, batch_size=4)
        for prompt, completion, value in zip(PROMPTS, completions, got):
            ids = (
                completion
                if isinstance(completion, list)
                else tokenizer(completion, add_special_tokens=False)["input_ids"]
            )
            assert value == pytest.approx(
                _manual_logprob(model, tokenizer, prompt, ids, temperature), abs=1e-4
            )
            assert value < 0
    per_token = sequence_logprobs(model, tokenizer, PROMPTS, completions, per_token=True)
    assert [len(v) for v in per_token] == [1, 3, 2, 6]
    assert [sum(v) for v in per_token] == pytest.approx(
        sequence_logprobs(model, tokenizer, PROMPTS, completions)
    )


def test_sampling_follows_the_tempered_softmax(model, tokenizer):
    # one new token, many samples: empirical frequencies match exp(sequence_logprobs) at that temperature
    n, temperature = 1200, 0.5
    samples = generate_completions(
        model,
        tokenizer,
        ["What is"] * n,
        max_new_tokens=1,
        batch_size=600,
        do_sample=True,
        temperature=temperature,
    )
    tokens = [r["token_ids"][0] for r in samples]
    values, counts = np.unique(tokens, return_counts=True)
    for tok, count in sorted(zip(values, counts), key=lambda x: -x[1])[:3]:
        p = math.exp(
            sequence_logprobs(model, tokenizer, ["What is"], [[int(tok)]], temperature=temperature)[0]
        )
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_kl_between_sampled_policy_and_reference(model, tokenizer):
    samples = generate_completions(
        model, tokenizer, PROMPTS * 4, max_new_tokens=6, batch_size=8, do_sample=True, temperature=1.0, seed=2
    )
    prompts = [r["prompt_text"] for r in samples]
    ids = [r["token_ids"] for r in samples]
    policy = sequence_logprobs(model, tokenizer, prompts, ids, per_token=True)
    itself = stats.kl_monte_carlo(policy, sequence_logprobs(model, tokenizer, prompts, ids, per_token=True))
    assert itself["k1"] == pytest.approx(0.0, abs=1e-6) and itself["k3"] == pytest.approx(0.0, abs=1e-6)
    reference = build_tiny_llama(tokenizer, seed=1)
    other = stats.kl_monte_carlo(policy, sequence_logprobs(reference, tokenizer, prompts, ids, per_token=True))
    assert other["k3"] > 0 and math.isfinite(other["k1"])


def test_text_nll_matches_cross_entropy_and_gives_a_perplexity(model, tokenizer):
    texts = [
        "What is 2 + 3? 5",
        "Hi there",
        [{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "2"}],
    ]
    total_nll, total_tokens = text_nll(model, tokenizer, texts, batch_size=2)
    expected_nll, expected_tokens = 0.0, 0
    for text in texts:
        rendered = text if isinstance(text, str) else tokenizer.apply_chat_template(text, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=isinstance(text, str))["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        expected_nll += float(
            torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        )
        expected_tokens += len(ids) - 1
    assert total_tokens == expected_tokens
    assert total_nll == pytest.approx(expected_nll, rel=1e-5)
    ppl = stats.perplexity_from_nll(total_nll, total_tokens)
    assert 1.0 < ppl < 10 * len(tokenizer)  # a random model is about as unsure as the vocabulary is large


def test_completion_nll_scores_only_the_answer_and_its_end_of_turn(model, tokenizer):
    """Perplexity of reference completions: prompt tokens conditioned on, never scored."""
    prompts = [[{"role": "user", "content": "1 + 1"}], "What is 2 + 3?"]
    completions = [[{"role": "assistant", "content": "2"}], " 5"]
    total_nll, total_tokens = completion_nll(model, tokenizer, prompts, completions, batch_size=1)
    expected_nll, expected_tokens = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        if isinstance(prompt, str):
            head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            full = head + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:
            head = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
            full = tokenizer(tokenizer.apply_chat_template(prompt + completion, tokenize=False),
                             add_special_tokens=False)["input_ids"]
        assert full[: len(head)] == head
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0]
        # logits at position t predict token t + 1: the answer's tokens are full[len(head):]
        expected_nll += float(torch.nn.functional.cross_entropy(
            logits[len(head) - 1: -1], torch.tensor(full[len(head):]), reduction="sum"))
        expected_tokens += len(full) - len(head)
    assert total_tokens == expected_tokens
    assert total_nll == pytest.approx(expected_nll, rel=1e-5)
    chat_answer = tokenizer.apply_chat_template(prompts[0] + completions[0], tokenize=False)
    assert "2<|im_end|>" in chat_answer  # the end-of-turn token is part of the scored answer
