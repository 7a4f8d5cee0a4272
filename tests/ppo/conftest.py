"""Tiny offline models and a tiny word-level tokenizer for the PPO tests (CPU, seconds)."""

import copy

import pytest
import torch

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]

# The models are tiny: one thread is fastest, and it keeps the tests quick on a shared, busy CPU.
torch.set_num_threads(1)


def make_tokenizer():
    """Word-level tokenizer: <pad>=0, </s>=1 (EOS), <s>=2 (BOS), then WORDS. Pad differs from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<pad>"
    )


def make_llama(tokenizer, seed=0, dropout=0.0, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        attention_dropout=dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def make_seq_critic(tokenizer, seed=1, hidden=32):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from policies.value import SequenceCritic

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return SequenceCritic(LlamaForSequenceClassification(config))


def grpo_trainer(tokenizer, **config):
    """A GRPO trainer on a fresh seed-0 llama: 4 prompts x 4 generations, rewarded by completion length (words).
    ``config`` overrides the PPOConfig below (the shared set-up of the packed / shared-prompt equality tests)."""
    from alignment.ppo import PPOConfig, PPOTrainer

    lm = make_llama(tokenizer, seed=0)
    settings = dict(learning_rate=1e-3, batch_size=8, mini_batch_size=8, ppo_epochs=1, max_new_tokens=5,
                    temperature=0.7, total_steps=2, seed=0, advantage_estimator="grpo", num_generations=4)
    prompts = [{"prompt": p} for p in ("a b", "c d e", "f", "g h a b")]

    def reward(prompts, completions, **kw):
        return [float(len(c.split())) for c in completions]

    return PPOTrainer(PPOConfig(**{**settings, **config}), lm, copy.deepcopy(lm), None, tokenizer, reward, prompts)


def copy_model(model):
    return copy.deepcopy(model)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Each test gets its own accelerate state (see tests/conftest.py)."""
