"""Fixtures for the evaluation tests: a character-level tokenizer and a tiny random Llama, built offline."""

import string

import pytest

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_char_tokenizer():
    """Character-level tokenizer: every printable ASCII character is a token; pad != eos; BOS added."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    chars = sorted(set(string.ascii_letters + string.digits + " +-=?.,:!\n"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(tokenizer, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and the CPU is shared: no spinning worker threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    return build_tiny_llama(tokenizer)


def example_results(n_prompts=40, seed=0):
    """A results dict in report.py's schema, filled with the stats functions on synthetic scores."""
    import numpy as np

    from alignment.evaluation import stats

    rng = np.random.default_rng(seed)
    answers = [str(a + b) for a, b in zip(range(n_prompts), range(3, 3 + n_prompts))]
    prompts = [[{"role": "user", "content": f"What is {a} + {a + 3}?"}] for a in range(n_prompts)]
    skill = {"sft": 0.45, "dpo": 0.7}
    scores = {}
    checkpoints = {}
    for name, p in skill.items():
        correct = rng.random(n_prompts) < p
        completions = [ans if ok else str(int(ans) + 1) for ans, ok in zip(answers, correct)]
        rm = (rng.normal(loc=2 * p, scale=1.0, size=n_prompts)).tolist()
        rm[3] = None  # a prompt the reward model does not apply to
        scores[name] = {"correct": correct.astype(float).tolist(), "reward_model": rm}
        checkpoints[name] = {
            "path": f"runs/{name}/final",
            "metrics": {
                "greedy_accuracy": float(correct.mean()),
                "sampled_accuracy": float(correct.mean()) - 0.1,
                "reward": {src: stats.mean_std(v) for src, v in scores[name].items()},
                "perplexity": 3.2 + p,
                "mean_length": 2.0,
                "distinct_1": stats.distinct_n(completions, 1),
                "distinct_2": stats.distinct_n(completions, 2),
                "eos_rate": 1.0,
                "format_ok": 0.99,
            },
            "samples": [
                {"prompt": pr, "reference": ans, "completion": c, "correct": c == ans}
                for pr, ans, c in zip(prompts, answers, completions)
            ],
            "scores": scores[name],
        }
    checkpoints["dpo"]["metrics"]["win_rate"] = {
        src: stats.win_rate_with_ci(scores["dpo"][src], scores["sft"][src], n_resamples=300, seed=0)
        for src in ("correct", "reward_model")
    }
    checkpoints["dpo"]["metrics"]["kl_to_reference"] = {
        "k1": 0.42,
        "k1_stderr": 0.05,
        "k3": 0.4,
        "k3_stderr": 0.03,
        "n": 64,
    }
    checkpoints["sft"]["samples"][0]["completion"] = "7 | 8\nnine"  # markdown-hostile text
    return {
        "title": "Arithmetic demo",
        "spec": {"prompts": "data/tiny_arith/test.jsonl", "max_new_tokens": 8},
        "versions": {"torch": "2.x", "transformers": "5.x"},
        "seeds": {"generation": 0, "bootstrap": 0},
        "baseline": "sft",
        "reference": "sft",
        "checkpoints": checkpoints,
        "notes": ["synthetic numbers for a test"],
    }


def save_tiny_checkpoints(root, spec_text: str) -> tuple[dict, str]:
    """Two tiny random policies ("base", "other") saved as checkpoints under `root`, and an eval spec file."""
    import policies

    paths = {}
    for name, seed in (("base", 0), ("other", 1)):
        model, tokenizer = policies.load("tiny:1m", seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    spec = root / "eval.yaml"
    spec.write_text(spec_text)
    return paths, str(spec)
