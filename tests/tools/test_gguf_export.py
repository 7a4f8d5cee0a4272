"""GGUF writing: the pre-tokenizer read off the tokenizer, refusals, metadata, chat template, llama.cpp's own split."""

from __future__ import annotations

import json

import pytest

from alignment.errors import CheckpointError
from alignment.tools import gguf_export
from tests.tools.test_export import needs


def _tokenizer(pre_tokenizer, *, normalizer=None, byte_fallback=False, decoder=None):
    """A small byte-level BPE tokenizer with the given pre-tokenizer (tokenizers objects), as transformers wraps it."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=byte_fallback))
    tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.decoder = decoder or decoders.ByteLevel()
    from tokenizers import pre_tokenizers

    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["What is 12 + 30? It's 42.", "hello world, hello there"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def test_the_tiny_tokenizer_maps_to_llama_cpps_smollm_split(tiny_tokenizer):
    assert gguf_export.llama_cpp_pre_tokenizer(tiny_tokenizer) == ("smollm", [])


def test_known_hub_pre_tokenizers_map_to_their_llama_cpp_names():
    from tokenizers import Regex, normalizers, pre_tokenizers

    gpt2 = _tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False))
    assert gguf_export.llama_cpp_pre_tokenizer(gpt2) == ("gpt-2", [])
    # Qwen2 / Qwen2.5: NFC, a Split on its regex, ByteLevel without its own regex
    qwen2 = _tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_export._QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), normalizer=normalizers.NFC())
    name, caveats = gguf_export.llama_cpp_pre_tokenizer(qwen2)
    assert name == "qwen2" and caveats == [gguf_export._TOLERATED_NORMALIZERS["NFC"]]


def test_a_split_llama_cpp_cannot_make_is_refused_naming_it():
    from tokenizers import normalizers, pre_tokenizers

    prefixed = _tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True))
    with pytest.raises(CheckpointError, match=r"pre-tokenizer \[\('ByteLevel', 'add_prefix_space=True'"):
        gguf_export.llama_cpp_pre_tokenizer(prefixed)
    whitespace = _tokenizer(pre_tokenizers.WhitespaceSplit())
    with pytest.raises(CheckpointError, match=r"WhitespaceSplit.*known: \['gpt-2', 'llama-bpe', 'qwen2', 'smollm'\]"):
        gguf_export.llama_cpp_pre_tokenizer(whitespace)
    lowercased = _tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizer=normalizers.Lowercase())
    with pytest.raises(CheckpointError, match=r"normalizer \['Lowercase'\]"):
        gguf_export.llama_cpp_pre_tokenizer(lowercased)


def test_chat_template_loses_only_the_generation_tags(tiny_tokenizer):
    import jinja2

    template = gguf_export.gguf_chat_template(tiny_tokenizer)
    assert "endgeneration" in tiny_tokenizer.chat_template and "endgeneration" not in template
    messages = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]
    # plain jinja (no transformers extension), as llama-cpp-python renders it
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=False)
    assert rendered == "<|im_start|>user\nWhat is 1 + 1?<|im_end|><|im_start|>assistant\n2<|im_end|>"
    assert rendered == tiny_tokenizer.apply_chat_template(messages, tokenize=False)


def test_ollama_template_rebuilds_the_jinja_output(tiny_tokenizer):
    template = gguf_export.ollama_template(tiny_tokenizer)
    assert template.startswith("{{ range .Messages }}{{ if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>")
    assert template.endswith("{{ end }}{{ end }}<|im_start|>assistant\n")


def test_gguf_metadata_carries_tokenizer_exactly(tiny_model_dir, tmp_path):
    needs("gguf")
    import gguf

    import policies

    model, tokenizer = policies.load(str(tiny_model_dir), dtype="float32")
    info = gguf_export.write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0", tokenizer_dir=tiny_model_dir)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = {name: value.contents() for name, value in reader.fields.items()}
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "smollm"
    merges = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert field["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert field["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert field["tokenizer.ggml.token_type"][:4] == [gguf.TokenType.CONTROL] * 4  # pad, unk, im_start, im_end
    assert set(field["tokenizer.ggml.token_type"][4:]) == {gguf.TokenType.NORMAL}
    assert field["tokenizer.ggml.add_bos_token"] is False and field["tokenizer.ggml.eos_token_id"] == 3
    assert "endgeneration" not in field["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert info["tensor_types"] == {"Q8_0": 29, "F32": 9}


def test_rope_permutation_interleaves_the_two_halves():
    import torch

    weight = torch.arange(16.0).reshape(4, 4)
    permuted = gguf_export.permute_rope(weight, heads=1)
    assert torch.equal(permuted[:, 0], torch.tensor([0.0, 8.0, 4.0, 12.0]))


def test_llama_cpp_splits_probe_and_eval_prompts_as_transformers(tiny_model_dir, tmp_path, repo_root):
    needs("gguf")
    needs("llama_cpp")
    import policies
    from alignment.evaluation.generate import render_prompt
    from alignment.tools.export import eval_rows

    model, tokenizer = policies.load(str(tiny_model_dir), dtype="float32")
    gguf_export.write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32", tokenizer_dir=tiny_model_dir)
    rows = eval_rows(str(repo_root / "data/tiny_arith/eval.jsonl"), 50)
    texts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    assert gguf_export.verify_tokenizer(tmp_path / "m.gguf", tokenizer, texts) == {"texts": 58, "identical": 58}


def test_the_llama_cpp_check_catches_a_wrong_pre_tokenizer(tiny_model_dir, tmp_path, monkeypatch):
    """No fitting pre-tokenizer name (as the old exporter wrote): llama.cpp's default split differs, the check sees it.

    (GPT-2's split would not show here: this vocabulary has no merges across digits, so it gives the same ids.)
    """
    needs("gguf")
    needs("llama_cpp")
    import policies

    model, tokenizer = policies.load(str(tiny_model_dir), dtype="float32")
    monkeypatch.setattr(gguf_export, "llama_cpp_pre_tokenizer", lambda tokenizer: ("default", []))
    gguf_export.write_gguf(model, tokenizer, tmp_path / "wrong.gguf", "f32", tokenizer_dir=tiny_model_dir)
    llama = gguf_export.load_llama(tmp_path / "wrong.gguf", vocab_only=True)
    differing = gguf_export.check_tokenization(llama, tokenizer, gguf_export.PROBE_TEXTS)
    llama.close()
    assert [d["text"][:16] for d in differing] == ["What is 12 + 30?", "0 00 000 0000 12", "<|im_start|>user"]
    with pytest.raises(CheckpointError, match="llama.cpp tokenizes 3 of 8 probe texts differently"):
        gguf_export.verify_tokenizer(tmp_path / "wrong.gguf", tokenizer)
    assert not (tmp_path / "wrong.gguf").exists()
