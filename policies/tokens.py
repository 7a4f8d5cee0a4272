"""The tokens that end a response: one definition for generation, PPO rollouts, vLLM and the SFT data audit."""

from __future__ import annotations

__all__ = ["END_OF_TURN_TOKENS", "end_token_ids"]

# Tokens that close an assistant turn in common chat templates (ChatML/Qwen, Llama 3, Gemma, Phi, Llama 2,
# GPT-2 style), besides whatever the tokenizer and generation config name as EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>",
                      "<|end_of_text|>")


def end_token_ids(tokenizer, model=None) -> set[int]:
    """Every token id that ends a response.

    The tokenizer's EOS, the ids the model's generation config lists as EOS, and each of END_OF_TURN_TOKENS
    the vocabulary holds, except the pad token (Qwen2.5 pads with <|endoftext|>: a pad that also ended
    responses would be trained as an ending wherever a batch is padded).  Empty when none is known.
    """
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(generation, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    pad = tokenizer.pad_token_id
    for token in END_OF_TURN_TOKENS:
        # a lookup per token, not get_vocab(): PPO asks once per rollout, and a 150k vocabulary's dict costs more
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != pad and tokenizer.convert_ids_to_tokens(token_id) == token:
            ids.add(token_id)  # the round trip: an unknown token maps to the unk id, which is not that token
    return ids
