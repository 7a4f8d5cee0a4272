"""GGUF files that llama.cpp tokenizes and answers like transformers, and the checks that show it.

    from alignment.tools import gguf_export
    gguf_export.write_gguf(model, tokenizer, "exports/x/gguf/model-q8_0.gguf", "q8_0", tokenizer_dir="exports/x")

What the file must carry for llama.cpp to split a prompt as transformers does:

* ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE) and the token list in id order, each token
  typed as llama.cpp reads it (special added tokens CONTROL, other added tokens USER_DEFINED,
  the rest NORMAL, holes up to the embedding size UNUSED);
* ``tokenizer.ggml.pre``: the name of llama.cpp's pre-tokenizer whose split is the one the
  tokenizer's ``pre_tokenizer`` makes.  It is read off the tokenizer's own definition
  (:func:`llama_cpp_pre_tokenizer`) and, where llama-cpp-python is installed, confirmed by
  tokenizing a probe text with both (:func:`check_tokenization`); a tokenizer whose split no
  llama.cpp pre-tokenizer makes is refused, naming what does not fit;
* merges, special token ids and the chat template as the ``gguf`` package's
  :class:`gguf.SpecialVocab` reads them from the tokenizer directory, and whether a BOS / EOS is
  added, measured on the tokenizer itself.

Tensor names come from the ``gguf`` package's tensor map, the type of each tensor follows
llama.cpp's converter (1-D tensors and norms stay f32; a tensor whose rows do not fit the
quantisation block falls back to f16), and the quantisation itself is ``gguf.quants``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignment.errors import CheckpointError

# name -> (llama.cpp file type, tensor type of the 2-D weights); filled lazily (gguf is optional)
GGUF_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_GGUF_TYPES = ("f32", "f16", "q8_0")
SUPPORTED_ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}

# The split regexes of the two hub tokenizer families whose pre-tokenizer is a Split + ByteLevel
# (Llama 3 and Qwen2 / Qwen2.5), as their tokenizer.json files spell them; llama.cpp implements each
# under the name on the right.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_GPT2_REGEX = ("ByteLevel", "add_prefix_space=False", "use_regex=True")
_BYTE_LEVEL_NO_REGEX = ("ByteLevel", "add_prefix_space=False", "use_regex=False")

# A normalised description of a tokenizers pre-tokenizer pipeline -> (llama.cpp pre-tokenizer, ignore_merges
# that llama.cpp applies with it).  Each entry is a split llama.cpp makes with the same regexes.
LLAMA_CPP_PRE_TOKENIZERS: dict[tuple, tuple[str, bool]] = {
    (_BYTE_LEVEL_GPT2_REGEX,): ("gpt-2", False),
    # every digit its own piece, then GPT-2's regex: SmolLM's and StarCoder's tokenizers, and ours
    (("Digits", "individual_digits=True"), _BYTE_LEVEL_GPT2_REGEX): ("smollm", False),
    (("Split", _QWEN2_SPLIT, "Isolated", "invert=False"), _BYTE_LEVEL_NO_REGEX): ("qwen2", False),
    (("Split", _LLAMA3_SPLIT, "Isolated", "invert=False"), _BYTE_LEVEL_NO_REGEX): ("llama-bpe", True),
}

# Normalizers llama.cpp does not apply; NFC leaves text that is already NFC unchanged, so it is allowed
# with a caveat in the report (llama.cpp's own converter writes Qwen2 tokenizers, which carry it, the same way).
_TOLERATED_NORMALIZERS = {"NFC": "llama.cpp does not NFC-normalise: text not already in NFC may split differently"}

# The probe text tokenized by both sides before a GGUF is accepted: runs of spaces, tabs and newlines,
# digits alone and in runs, contractions in both cases, punctuation runs, accents, CJK, emoji (one
# joined with a zero-width joiner), and the chat-template markers.  Written for this check.
PROBE_TEXTS = (
    "What is 12 + 30?  The answer is 42.\n\nWhat is 7 * 8? 56",
    "  leading spaces, trailing spaces   \t tab\t\tand\n\n\nnewlines \r\n done",
    "0 00 000 0000 1234567890 3.14159 1,000,000 -17 +5 2^10",
    "I'm sure you'll see it's there; WE'RE, THEY'VE, she'D, it'S, I'LL ''quotes'' \"double\"",
    "!!!??? ...... ------====== ``` ~~~ ### @@@ $$$ %%% &&& *** ((())) [[[]]] {{{}}}",
    "caf\u00e9 na\u00efve \u00fcber \u0441\u043b\u043e\u0432\u043e \u03bb\u03cc\u03b3\u03bf\u03c2 "
    "\u4f60\u597d\u4e16\u754c \u3053\u3093\u306b\u3061\u306f \ud55c\uad6d\uc5b4",
    "\U0001f680 rocket \U0001f999\U0001f999 llamas \U0001f636\u200d\U0001f32b\ufe0f fog \u2705 done",
    "<|im_start|>user\nWhat is 3 + 4?<|im_end|><|im_start|>assistant\n7<|im_end|>",
)

# transformers' chat-template extension for training masks; jinja without that extension (llama.cpp,
# llama-cpp-python, Ollama) rejects it, and at inference it renders nothing.  Each tag becomes an
# always-true `if` block, which keeps the tag's whitespace control ({%- ... -%}) exactly.
_GENERATION_TAG = re.compile(r"{%(-?)\s*(end)?generation\s*(-?)%}")


def _neutral_tag(match) -> str:
    return "{%" + match[1] + (" endif " if match[2] else " if true ") + match[3] + "%}"


def gguf_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gguf") is not None


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ----------------------------------------------------------------------------- tokenizer


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"GGUF export needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} has none")
    return json.loads(backend.to_str())


def _describe_step(step: dict) -> tuple:
    """One pre-tokenizer step as a comparable tuple (only the fields that change the split)."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return ("ByteLevel", f"add_prefix_space={bool(step.get('add_prefix_space'))}",
                f"use_regex={bool(step.get('use_regex', True))}")
    if kind == "Digits":
        return ("Digits", f"individual_digits={bool(step.get('individual_digits'))}")
    if kind == "Split":
        pattern = step.get("pattern") or {}
        return ("Split", pattern.get("Regex", pattern.get("String")), step.get("behavior"),
                f"invert={bool(step.get('invert'))}")
    return (kind, json.dumps({k: v for k, v in step.items() if k != "type"}, sort_keys=True))


def describe_pre_tokenizer(tokenizer_json: dict) -> tuple:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else ([pre] if pre else [])
    return tuple(_describe_step(step) for step in steps)


def llama_cpp_pre_tokenizer(tokenizer) -> tuple[str, list[str]]:
    """(llama.cpp ``tokenizer.ggml.pre`` name, caveats) for this tokenizer, or CheckpointError naming the misfit."""
    data = _backend_json(tokenizer)
    model = data.get("model") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"tokenizer model {model.get('type')!r} (only byte-level BPE is written)")
    if model.get("byte_fallback"):
        problems.append("BPE with byte_fallback (a SentencePiece-style vocabulary)")
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        problems.append(f"decoder {(data.get('decoder') or {}).get('type')!r} (needs ByteLevel)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("BPE subword prefix/suffix")
    caveats = []
    normalizer = data.get("normalizer")
    if normalizer:
        kinds = [n.get("type") for n in normalizer.get("normalizers", [normalizer])]
        unsupported = [k for k in kinds if k not in _TOLERATED_NORMALIZERS]
        if unsupported:
            problems.append(f"normalizer {unsupported} (llama.cpp applies none)")
        caveats += [_TOLERATED_NORMALIZERS[k] for k in kinds if k in _TOLERATED_NORMALIZERS]
    for token in data.get("added_tokens", []):
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            problems.append(f"added token {token['content']!r} with lstrip/rstrip/single_word")
    described = describe_pre_tokenizer(data)
    match = LLAMA_CPP_PRE_TOKENIZERS.get(described)
    if match is None:
        problems.append(f"pre-tokenizer {list(described)} (no llama.cpp pre-tokenizer known to split the same way; "
                        f"known: {sorted(name for name, _ in LLAMA_CPP_PRE_TOKENIZERS.values())})")
    elif bool(model.get("ignore_merges")) != match[1]:
        problems.append(f"ignore_merges={bool(model.get('ignore_merges'))} with pre-tokenizer {match[0]!r} "
                        f"(llama.cpp uses ignore_merges={match[1]} there)")
    if problems:
        raise CheckpointError("GGUF export refused: llama.cpp would tokenize differently from transformers because of "
                              + "; ".join(problems))
    return match[0], caveats


def _added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) as the tokenizer really does when asked for special tokens."""
    plain = tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    full = tokenizer("What is 2 + 3?")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for add_bos, add_eos in ((False, False), (True, False), (False, True), (True, True)):
        if full == [bos] * add_bos + plain + [eos] * add_eos:
            return add_bos, add_eos
    raise CheckpointError(f"GGUF export refused: the tokenizer adds {full[:3]}...{full[-3:]} around the text, "
                          "not just a BOS and/or EOS, which llama.cpp cannot reproduce")


def gguf_chat_template(tokenizer) -> str | None:
    """The chat template with transformers' {% generation %} tags made plain jinja, checked to render the same text."""
    template = tokenizer.chat_template
    if not template:
        return None
    if not isinstance(template, str):
        raise CheckpointError("GGUF export: the tokenizer has several named chat templates; only one is written")
    cleaned = _GENERATION_TAG.sub(_neutral_tag, template)
    if cleaned != template:
        conversation = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                        {"role": "user", "content": "And 4 + 4?"}]
        for messages, add_prompt in ((conversation, False), (conversation[:1], True)):
            before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_prompt)
            after = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_prompt,
                                                  chat_template=cleaned)
            if before != after:
                raise CheckpointError("GGUF export: replacing the {% generation %} tags changed the chat template's "
                                      "output; write the template without them by hand")
    return cleaned


def _token_table(tokenizer, size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their llama.cpp types, padded with UNUSED entries up to `size`."""
    import gguf

    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if len(by_id) > size:
        raise CheckpointError(f"the tokenizer has {len(by_id)} tokens but the model's embedding only {size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(added[token_id].content)
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


# ----------------------------------------------------------------------------- writer


def _types(name: str):
    import gguf

    table = {
        "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
        "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    }
    if name not in table:
        raise CheckpointError(f"GGUF type {name!r} is not written here; choose from {', '.join(GGUF_TYPE_NAMES)}")
    return table[name]


def permute_rope(weight, heads: int):
    """llama.cpp's Llama q/k layout: the two rotary halves of each head interleaved (as its converter does)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"GGUF export: rope scaling {rope_type!r} is not written by this exporter")
    return float(getattr(config, "rope_theta", None) or parameters.get("rope_theta", 10000.0))


def _tensor_type(gguf_name: str, data, wanted):
    """llama.cpp's converter rule: 1-D tensors, norms and non-weights stay f32, the rest take the file's type."""
    import gguf

    if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return wanted


def write_gguf(model, tokenizer, path: str | Path, gguf_type: str = "f32", *, tokenizer_dir: str | Path) -> dict:
    """Write `model` + `tokenizer` as a GGUF file of `gguf_type`; returns what was written (for the report).

    `tokenizer_dir` is the saved transformers directory of the same tokenizer: ``gguf.SpecialVocab``
    reads merges, special tokens and the chat template from its files.
    """
    import gguf
    import numpy as np

    config = model.config
    arch = SUPPORTED_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise CheckpointError(f"GGUF export supports {sorted(SUPPORTED_ARCHITECTURES)} models, not {config.model_type!r}")
    pre_tokenizer, caveats = llama_cpp_pre_tokenizer(tokenizer)
    add_bos, add_eos = _added_special_tokens(tokenizer)
    file_type, weight_type = _types(gguf_type)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tokens, token_types = _token_table(tokenizer, n_vocab)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch_enum = getattr(gguf.MODEL_ARCH, arch)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch_enum])
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
    writer.add_file_type(file_type)
    if weight_type == gguf.GGMLQuantizationType.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(str(tokenizer_dir), load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise CheckpointError(f"{tokenizer_dir}: no BPE merges found in tokenizer.json")
    # measured on the tokenizer, not parsed from its post-processor: llama.cpp adds exactly these
    special.add_special_token.update(bos=add_bos, eos=add_eos)
    special.chat_template = gguf_chat_template(tokenizer)
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_freq_base
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CheckpointError(f"GGUF export: no llama.cpp name for tensor {key!r} of a {config.model_type} model")
        data = tensor.detach().float()
        if arch == "LLAMA" and key.endswith("self_attn.q_proj.weight"):
            data = permute_rope(data, config.num_attention_heads)
        elif arch == "LLAMA" and key.endswith("self_attn.k_proj.weight"):
            data = permute_rope(data, config.num_key_value_heads)
        data = data.numpy().astype(np.float32)
        qtype = _tensor_type(gguf_name, data, weight_type)
        try:
            stored = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not a multiple of the block: f16, as llama.cpp's converter does
            qtype = gguf.GGMLQuantizationType.F16
            stored = gguf.quants.quantize(data, qtype)
        writer.add_tensor(gguf_name, stored, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "type": gguf_type, "pre_tokenizer": pre_tokenizer, "add_bos": add_bos,
            "add_eos": add_eos, "tensor_types": counts, "caveats": caveats}


# ----------------------------------------------------------------------------- Ollama


def _chat_pieces(tokenizer):
    """Per-role (prefix, suffix) and the generation prompt, read off the template's own output."""
    marker = "\x00CONTENT\x00"

    def render(messages, add_prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_prompt)

    user = render([{"role": "user", "content": marker}])
    generation = render([{"role": "user", "content": marker}], True)[len(user):]
    pair = render([{"role": "user", "content": marker}, {"role": "assistant", "content": marker}])
    pieces = {"user": tuple(user.split(marker)), "assistant": tuple(pair[len(user):].split(marker))}
    try:
        system = render([{"role": "system", "content": marker}, {"role": "user", "content": marker}])
        pieces["system"] = tuple(system[: len(system) - len(user)].split(marker))
    except Exception:  # a template that refuses system messages: none in the Ollama template either
        pass
    return pieces, generation


def ollama_template(tokenizer) -> str | None:
    """An Ollama (Go text/template) version of the chat template, or None where it cannot be shown equal.

    The pieces are read off the jinja template's output and the result is checked by rebuilding a
    three-turn conversation; a template with logic beyond "wrap each message" (a default system
    prompt, tool calls) gets None, and Ollama then uses its own reading of the GGUF's template.
    """
    if not tokenizer.chat_template:
        return None
    pieces, generation = _chat_pieces(tokenizer)
    if any(len(p) != 2 for p in pieces.values()):
        return None
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    if "system" in pieces:
        conversation.insert(0, {"role": "system", "content": "s"})
    rebuilt = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in conversation) + generation
    if rebuilt != tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True):
        return None
    text = "".join(pieces[r][0] + pieces[r][1] + generation for r in pieces)
    if "{{" in text or '"""' in text:
        return None
    # no "{{-" trimming: it would eat the newlines the template writes between messages
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}'
                       for i, (role, (pre, post)) in enumerate(pieces.items()))
    return f"{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{generation}"


def write_modelfile(directory: Path, gguf_file: str, tokenizer) -> Path:
    """An Ollama Modelfile beside the GGUF: FROM, the chat template (where it converts), stop tokens, greedy."""
    lines = [f"# Written by `align export`. Run: ollama create NAME -f {directory.name}/Modelfile", f"FROM ./{gguf_file}"]
    template = ollama_template(tokenizer)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: the chat template does not convert exactly; Ollama reads the GGUF's own")
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    lines.append("PARAMETER temperature 0")  # greedy, as the export report measured it
    path = directory / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- llama.cpp side


def load_llama(path: str | Path, *, vocab_only: bool = False, threads: int = 1):
    """llama-cpp-python's Llama over a GGUF file, quiet, on the CPU.

    The full model takes the file's context length (n_ctx=0); a vocabulary-only load has no
    context length of its own and still creates a context, so it gets a small fixed one.
    """
    from llama_cpp import Llama

    return Llama(model_path=str(path), vocab_only=vocab_only, n_threads=threads, n_threads_batch=threads,
                 n_ctx=512 if vocab_only else 0, n_gpu_layers=0, verbose=False, seed=0)


def llama_token_ids(llama, text: str) -> list[int]:
    """llama.cpp's ids for `text`, with the BOS/EOS the GGUF says to add and special tokens parsed."""
    return llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def hf_token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def check_tokenization(llama, tokenizer, texts) -> list[dict]:
    """The texts whose llama.cpp token ids differ from transformers' (empty when all agree)."""
    differing = []
    for text in texts:
        ours, theirs = hf_token_ids(tokenizer, text), llama_token_ids(llama, text)
        if ours != theirs:
            differing.append({"text": text, "transformers": ours, "llama.cpp": theirs})
    return differing


def verify_tokenizer(path: Path, tokenizer, extra_texts=()) -> dict:
    """Load the GGUF's vocabulary in llama.cpp and tokenize the probe texts; on any difference, remove the file
    and raise CheckpointError."""
    llama = load_llama(path, vocab_only=True)
    texts = list(PROBE_TEXTS) + list(extra_texts)
    try:
        differing = check_tokenization(llama, tokenizer, texts)
    finally:
        llama.close()
    if differing:
        Path(path).unlink()  # a file that tokenizes differently must not be left for someone to use
        first = differing[0]
        raise CheckpointError(f"{path}: llama.cpp tokenizes {len(differing)} of {len(texts)} probe texts differently "
                              f"from transformers, e.g. {first['text']!r:.60}: {first['transformers'][:12]} vs "
                              f"{first['llama.cpp'][:12]}; the file was removed")
    return {"texts": len(texts), "identical": len(texts)}


def fresh_context(llama) -> None:
    """Forget every cached token, KV cache included, so each prompt starts from nothing (as in transformers).

    ``Llama.reset()`` alone forgets the Python-side token list but not llama.cpp's KV cache, and
    llama-cpp-python's prefix reuse across prompts filled a 256-token cache after ~40 short prompts
    here ("failed to find a memory slot"); llama.cpp's own ``llama_memory_clear`` empties it.
    """
    import llama_cpp

    llama.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llama.ctx), True)


def _end_after(max_new_tokens: int, eos_id: int):
    """A logits processor that forces EOS once `max_new_tokens` tokens were generated.

    llama-cpp-python skips its max_tokens check while the text so far ends in an incomplete UTF-8
    sequence, so a model that keeps emitting such bytes (a random one does) runs on until the
    context is full; this cap ends it where transformers' max_new_tokens would.
    """
    import numpy as np
    from llama_cpp import LogitsProcessorList

    prompt_length: list[int] = []

    def cap(input_ids, scores):
        if not prompt_length:
            prompt_length.append(len(input_ids))
        if len(input_ids) - prompt_length[0] >= max_new_tokens:
            scores[:] = -np.inf
            scores[eos_id] = 0.0
        return scores

    return LogitsProcessorList([cap])


def chat_answers(llama, prompts, max_new_tokens: int) -> list[str]:
    """Greedy chat completions through llama-cpp-python's chat path (the GGUF's own chat template)."""
    answers = []
    for messages in prompts:
        fresh_context(llama)
        result = llama.create_chat_completion(messages=list(messages), max_tokens=max_new_tokens, temperature=0.0,
                                              top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0,
                                              logits_processor=_end_after(max_new_tokens, llama.token_eos()))
        answers.append(result["choices"][0]["message"]["content"] or "")
    return answers


def llama_speed(llama, tokenizer, prompts, new_tokens: int, repeats: int) -> dict:
    """llama.cpp tokens/s: greedy, batch 1, exactly `new_tokens` per prompt (end-of-generation tokens banned)."""
    import statistics
    import time

    from alignment.evaluation.generate import render_prompt

    banned = {i: float("-inf") for i in {tokenizer.eos_token_id, tokenizer.pad_token_id} if i is not None}
    texts = [render_prompt(tokenizer, p) for p in prompts]

    def run(batch):
        from llama_cpp import StoppingCriteriaList

        start = time.perf_counter()
        for text in batch:
            fresh_context(llama)
            prompt_length = len(llama_token_ids(llama, text))
            # stops at exactly new_tokens even inside an incomplete UTF-8 sequence (see _end_after)
            enough = StoppingCriteriaList([lambda ids, _logits, n=prompt_length: len(ids) - n >= new_tokens])
            llama.create_completion(text, max_tokens=new_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                    logit_bias=banned, stopping_criteria=enough, seed=0)
        return time.perf_counter() - start

    run(texts[:1])  # warm-up
    seconds = [run(texts) for _ in range(repeats)]
    median = statistics.median(seconds)
    return {"tokens_per_s": round(len(texts) * new_tokens / median, 1), "seconds": round(median, 3),
            "all_seconds": [round(x, 3) for x in seconds], "engine": "llama.cpp"}
