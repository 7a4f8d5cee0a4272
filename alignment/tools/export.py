"""`align export`: turn a checkpoint into deployable artefacts, and measure what each one costs.

    align export runs/tiny/sft --output exports/tiny-sft --int8 --prune 0.3
    align export runs/lora/checkpoints/checkpoint-400 --output exports/merged --merge-lora

Always written: OUTPUT itself, a clean transformers directory in fp32
(config, ``model.safetensors``, generation config, tokenizer, nothing else);
with ``--merge-lora`` the LoRA adapter is first merged into its base (peft).
Variants, each in a sub-folder:

* ``--int8`` -> ``int8/``: dynamic int8 quantisation of every ``nn.Linear`` for CPU
  inference (``torch.ao.quantization.quantize_dynamic``).  A quantised model is not a
  transformers checkpoint; its weights are stored as plain tensors in
  ``model_int8.safetensors`` (int8 values + scale + zero point per layer, no pickle)
  and :func:`load_int8` rebuilds the model.  ``align chat`` / ``align generate`` load it.
* ``--prune AMOUNT`` -> ``pruned/``: global L1 magnitude pruning of the Linear weights
  (the output embedding excluded), made permanent; a transformers directory (dense
  storage: the zeros do not make the file smaller).
* ``--gguf`` -> ``gguf/model.gguf`` when the ``gguf`` package is installed (experimental);
  otherwise the report says it is unavailable and the other exports go on.

Each export writes ``export_report.json`` and ``export_report.md``: file size, CPU
generation speed (greedy, batch 1, the same prompts, a fixed number of new tokens)
and held-out accuracy (``answer_match`` on ``--eval-data``) of every variant next to
fp32, with the tolerance each variant is held to.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path

from alignment.errors import CheckpointError, DataError

INT8_WEIGHTS = "model_int8.safetensors"
INT8_MARKER = "quantization.json"
DEFAULT_EVAL = "data/tiny_arith/eval.jsonl"
EXPORT_MARKER = ".align-export"  # lets a later export replace this folder
_INT8_SUFFIXES = (".weight_int8", ".weight_scale", ".weight_zero_point", ".weight_axis", ".bias")


# ----------------------------------------------------------------------------- loading


def is_adapter(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def is_int8_export(path: Path) -> bool:
    return (Path(path) / INT8_MARKER).is_file()


def load_source(spec: str, *, merge_lora: bool = False, base: str | None = None):
    """(fp32 CPU model, tokenizer, description) of the checkpoint to export."""
    import policies
    from alignment.checkpoint import require_finished_run

    path = Path(spec)
    require_finished_run(spec)
    if is_int8_export(path):
        raise CheckpointError(f"{spec} is already an int8 export; export from the fp32 checkpoint")
    if is_adapter(path):
        if not merge_lora:
            raise CheckpointError(f"{spec} holds a LoRA adapter (adapter_config.json), not a full model; "
                                  "pass --merge-lora to merge it into its base")
        return merge_adapter(path, base)
    if merge_lora:
        raise CheckpointError(f"--merge-lora was given but {spec} has no adapter_config.json "
                              "(run directories of this toolkit already hold merged weights)")
    model, tokenizer = policies.load(spec, dtype="float32", device="cpu")
    return model, tokenizer, {"source": spec, "lora_merged": False}


def merge_adapter(adapter_dir: Path, base: str | None):
    """Load the adapter's base model, apply the adapter, merge it into the weights (peft merge_and_unload)."""
    from peft import PeftConfig, PeftModel

    import policies

    config = PeftConfig.from_pretrained(str(adapter_dir))
    base_spec = base or config.base_model_name_or_path
    if not base_spec:
        raise CheckpointError(f"{adapter_dir}: the adapter does not name its base model; pass --base DIR")
    if base_spec.startswith("tiny:") and base is None:
        raise CheckpointError(f"{adapter_dir}: the adapter's base is {base_spec!r}, a random model that cannot be "
                              "rebuilt exactly; pass --base with the saved starting model (e.g. RUN/initial_model)")
    model, tokenizer = policies.load(base_spec, dtype="float32", device="cpu")
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = policies.load_tokenizer(str(adapter_dir))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged, tokenizer, {"source": str(adapter_dir), "lora_merged": True, "base": base_spec,
                               "lora_r": getattr(config, "r", None)}


def load_any(spec: str):
    """A model for inference from a checkpoint, an int8 export, or any spec `policies.load` takes."""
    import policies

    if is_int8_export(Path(spec)):
        return load_int8(spec)
    return policies.load(spec)


# ----------------------------------------------------------------------------- int8


@contextlib.contextmanager
def _quiet():
    """torch.ao.quantization warns that it is deprecated in favour of torchao; the API still works."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quantize_int8(model):
    """A dynamic int8 copy of `model` (every nn.Linear; activations quantised on the fly), for CPU."""
    import torch

    with _quiet():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def _dynamic_linear_class():
    import torch

    return torch.ao.nn.quantized.dynamic.Linear


def int8_tensors(qmodel) -> dict:
    """Plain tensors for safetensors: int8 values, scales and zero points of each quantised layer, the rest as is."""
    import torch

    linear = _dynamic_linear_class()
    tensors, prefixes = {}, []
    for name, module in qmodel.named_modules():
        if not isinstance(module, linear):
            continue
        prefixes.append(name + ".")
        weight, bias = module._weight_bias()
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            tensors[f"{name}.weight_scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
            tensors[f"{name}.weight_zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
        else:
            tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales().to(torch.float64)
            tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points().to(torch.int64)
            tensors[f"{name}.weight_axis"] = torch.tensor([weight.q_per_channel_axis()], dtype=torch.int64)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    for key, value in qmodel.state_dict().items():
        if not any(key.startswith(p) for p in prefixes) and isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous()
    return tensors


def save_int8(qmodel, tokenizer, out_dir: Path) -> Path:
    """config + tokenizer + model_int8.safetensors + quantization.json + README.md (how to load it)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    qmodel.config.save_pretrained(str(out_dir))
    if getattr(qmodel, "generation_config", None) is not None:
        qmodel.generation_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    save_file(int8_tensors(qmodel), str(out_dir / INT8_WEIGHTS), metadata={"format": "alignment-int8-dynamic"})
    marker = {
        "method": "torch.ao.quantization.quantize_dynamic",
        "modules": ["torch.nn.Linear"],
        "dtype": "qint8",
        "weights": INT8_WEIGHTS,
        "loader": "alignment.tools.export:load_int8",
        "note": "not loadable by AutoModelForCausalLM.from_pretrained; use load_int8(dir) or `align chat DIR`",
    }
    (out_dir / INT8_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(
        "# int8 (dynamic) export\n\n"
        "Every `nn.Linear` of the model quantised to int8 with `torch.ao.quantization.quantize_dynamic`\n"
        "(activations are quantised on the fly; for CPU inference). The weights are stored without pickle\n"
        f"in `{INT8_WEIGHTS}`: for each quantised layer `<name>.weight_int8`, `.weight_scale`,\n"
        "`.weight_zero_point` (and `.bias`); every other tensor as in the fp32 model.\n\n"
        "Load it with\n\n```python\nfrom alignment.tools.export import load_int8\n"
        "model, tokenizer = load_int8('THIS_DIR')\n```\n\nor run `align chat THIS_DIR`.\n",
        encoding="utf-8",
    )
    return out_dir / INT8_WEIGHTS


def load_int8(directory: str | Path):
    """Rebuild an int8 export: model from its config, quantised, then the stored int8 weights put back."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import policies

    directory = Path(directory)
    if not is_int8_export(directory):
        raise CheckpointError(f"{directory} is not an int8 export (no {INT8_MARKER})")
    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config)
    qmodel = quantize_int8(model)
    tensors = load_file(str(directory / INT8_WEIGHTS))
    linear = _dynamic_linear_class()
    restored = set()
    for name, module in qmodel.named_modules():
        if not isinstance(module, linear):
            continue
        values = tensors[f"{name}.weight_int8"]
        scale, zero_point = tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"]
        if f"{name}.weight_axis" in tensors:
            axis = int(tensors[f"{name}.weight_axis"][0])
            shape = [-1 if d == axis else 1 for d in range(values.dim())]
            real = (values.double() - zero_point.view(shape)) * scale.view(shape)
            weight = torch.quantize_per_channel(real.float(), scale, zero_point, axis, torch.qint8)
        else:
            real = (values.double() - float(zero_point[0])) * float(scale[0])
            weight = torch.quantize_per_tensor(real.float(), float(scale[0]), int(zero_point[0]), torch.qint8)
        module.set_weight_bias(weight, tensors.get(f"{name}.bias"))
        restored.update(f"{name}{suffix}" for suffix in _INT8_SUFFIXES)
    # The other tensors (embeddings, norms) are copied in place; load_state_dict would ask the
    # quantised layers for their pickle-era keys.
    rest = {k: v for k, v in tensors.items() if k not in restored}
    quantized_prefixes = tuple(n + "." for n, m in qmodel.named_modules() if isinstance(m, linear))
    own = {k: v for k, v in qmodel.state_dict().items() if not k.startswith(quantized_prefixes)}
    missing, unexpected = sorted(set(own) - set(rest)), sorted(set(rest) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: int8 weights do not match the config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    with torch.no_grad():
        for key, value in rest.items():
            own[key].copy_(value)
    tokenizer = policies.load_tokenizer(str(directory))
    if qmodel.config.pad_token_id is None:
        qmodel.config.pad_token_id = tokenizer.pad_token_id
    return qmodel.eval(), tokenizer


# ----------------------------------------------------------------------------- pruning


def prune_global_l1(model, amount: float) -> tuple[object, float]:
    """A copy of `model` with the `amount` smallest-magnitude Linear weights (globally) set to zero, permanently.

    The output embedding is left out: it is often tied to the input embedding,
    and pruning it would prune (and untie) the embedding too.  Returns the model
    and the measured share of zeros among the pruned weights.
    """
    import torch
    from torch.nn.utils import prune

    if not 0 < amount < 1:
        raise DataError(f"--prune is the share of weights to remove and must be in (0, 1), got {amount}")
    pruned = copy.deepcopy(model).cpu()
    output = pruned.get_output_embeddings()
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, torch.nn.Linear) and m is not output]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    return pruned, zeros / total


# ----------------------------------------------------------------------------- gguf (optional)


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def _permute_rope(weight, heads: int):
    """llama.cpp's layout for Llama q/k projections (its converter reorders rotary halves the same way)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, path: Path) -> Path:
    """Experimental: an f32 GGUF file for Llama / Qwen2 models with a byte-level BPE tokenizer.

    Tensor names, the q/k reordering and the metadata keys follow llama.cpp's
    converter; this writer is not checked against llama.cpp here.
    """
    import gguf

    config = model.config
    arch = {"llama": "llama", "qwen2": "qwen2"}.get(config.model_type)
    if arch is None:
        raise CheckpointError(f"GGUF export supports llama and qwen2 models, not {config.model_type!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, tensor in model.state_dict().items():
        data = tensor.detach().float()
        if key == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif key == "model.norm.weight":
            out = "output_norm.weight"
        elif key == "lm_head.weight":
            if getattr(config, "tie_word_embeddings", False):
                continue
            out = "output.weight"
        elif key.startswith("model.layers."):
            _, _, layer, rest = key.split(".", 3)
            module, _, kind = rest.rpartition(".")
            if module not in names:
                continue
            if arch == "llama" and module == "self_attn.q_proj" and kind == "weight":
                data = _permute_rope(data, config.num_attention_heads)
            if arch == "llama" and module == "self_attn.k_proj" and kind == "weight":
                data = _permute_rope(data, config.num_key_value_heads)
            out = f"blk.{layer}.{names[module]}.{kind}"
        else:
            continue
        writer.add_tensor(out, data.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- measurements


def file_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def weight_files(directory: Path) -> list[Path]:
    return sorted(list(directory.glob("*.safetensors")) + list(directory.glob("*.gguf")))


def eval_rows(path: str, limit: int | None) -> list[dict]:
    from alignment.data import load_rows

    rows, _ = load_rows(path, "prompt", max_samples=limit)
    if not all("answer" in row for row in rows):
        raise DataError(f"{path}: accuracy needs an 'answer' column (read by answer_match) in every row")
    return rows


def accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 64) -> tuple[float, list[str]]:
    """Greedy held-out accuracy (answer_match) and the completions."""
    import reward
    from alignment.evaluation.generate import generate_completions

    prompts = [row["prompt"] for row in rows]
    samples = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    completions = [s["text"] for s in samples]
    scored = reward.build([{"source": "answer_match"}])(prompts, completions, answer=[row["answer"] for row in rows])
    applied = [s for s in scored.per_source["answer_match"] if s is not None]
    return (sum(applied) / len(applied) if applied else float("nan")), completions


def generation_speed(models: dict, prompts: list, new_tokens: int = 32, repeats: int = 3) -> dict:
    """CPU tokens/s of each model: greedy, batch 1, exactly `new_tokens` per prompt (EOS suppressed until then).

    `models` maps a name to (model, tokenizer).  After one warm-up generation each,
    the models are timed in turns (round-robin, `repeats` rounds) so that a change in
    machine load hits all of them alike; the median round is reported.
    """
    import torch

    from alignment.evaluation.generate import render_prompt

    def encode(tokenizer):
        return [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False, return_tensors="pt")["input_ids"]
                for p in prompts]

    def run(model, tokenizer, encoded):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                      temperature=None, top_k=None, top_p=None)
        start = time.perf_counter()
        with torch.inference_mode():
            for ids in encoded:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return time.perf_counter() - start

    inputs = {name: encode(tokenizer) for name, (_, tokenizer) in models.items()}
    timings: dict[str, list[float]] = {name: [] for name in models}
    for name, (model, tokenizer) in models.items():
        model.eval()
        run(model, tokenizer, inputs[name][:1])  # warm-up
    for _ in range(repeats):
        for name, (model, tokenizer) in models.items():
            timings[name].append(run(model, tokenizer, inputs[name]))
    out = {}
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        out[name] = {"tokens_per_s": round(len(prompts) * new_tokens / median, 1), "seconds": round(median, 3),
                     "all_seconds": [round(x, 3) for x in seconds]}
    return out


# ----------------------------------------------------------------------------- export


def export(
    checkpoint: str,
    output: str | Path,
    *,
    merge_lora: bool = False,
    base: str | None = None,
    int8: bool = False,
    prune: float | None = None,
    gguf: bool = False,
    eval_data: str | None = DEFAULT_EVAL,
    eval_samples: int | None = None,
    max_new_tokens: int = 6,
    speed_prompts: int = 8,
    speed_tokens: int = 32,
    speed_repeats: int = 3,
    threads: int | None = 1,
    tolerance: float = 0.05,
) -> dict:
    """Write the fp32 export and the asked-for variants into `output`, measure each, write the report.

    Everything runs with `threads` torch threads (default 1: single-threaded timings are
    comparable between machines, and several threads on a busy CPU can run many times
    slower); None keeps torch's setting.
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _export(checkpoint, output, merge_lora=merge_lora, base=base, int8=int8, prune=prune, gguf=gguf,
                       eval_data=eval_data, eval_samples=eval_samples, max_new_tokens=max_new_tokens,
                       speed_prompts=speed_prompts, speed_tokens=speed_tokens, speed_repeats=speed_repeats,
                       tolerance=tolerance)
    finally:
        torch.set_num_threads(previous_threads)


def _export(checkpoint, output, *, merge_lora, base, int8, prune, gguf, eval_data, eval_samples, max_new_tokens,
            speed_prompts, speed_tokens, speed_repeats, tolerance) -> dict:
    import torch

    from alignment.checkpoint import write_atomic, write_json

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not (output / EXPORT_MARKER).is_file():
            raise CheckpointError(f"{output} exists and is not an earlier export; choose an empty or new folder")
        shutil.rmtree(output)  # an earlier (or interrupted) export of ours: replaced
    output.mkdir(parents=True, exist_ok=True)
    (output / EXPORT_MARKER).write_text("written by align export\n", encoding="utf-8")
    started = time.time()
    model, tokenizer, source = load_source(checkpoint, merge_lora=merge_lora, base=base)
    model.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))

    variants: dict[str, dict] = {"fp32": {"path": str(output), "files": [p.name for p in weight_files(output)]}}
    if int8:
        weights = save_int8(quantize_int8(model), tokenizer, output / "int8")
        variants["int8"] = {"path": str(output / "int8"), "files": [weights.name], "format": "safetensors (int8 + scales)"}
    if prune:
        pruned, sparsity = prune_global_l1(model, prune)
        pruned.save_pretrained(str(output / "pruned"), safe_serialization=True)
        tokenizer.save_pretrained(str(output / "pruned"))
        variants["pruned"] = {"path": str(output / "pruned"), "files": ["model.safetensors"], "amount": prune,
                              "linear_weight_sparsity": round(sparsity, 4),
                              "note": "stored dense: zeros speed nothing up and save no space without sparse kernels"}
        del pruned
    if gguf:
        if gguf_available():
            path = write_gguf(model, tokenizer, output / "gguf" / "model.gguf")
            variants["gguf"] = {"path": str(path.parent), "files": [path.name], "status": "written (experimental)",
                                "note": "f32 tensors; not measured here (needs llama.cpp)"}
        else:
            variants["gguf"] = {"status": "unavailable", "note": "the gguf package is not installed (pip install gguf)"}
    del model

    eval_path = eval_data if eval_data and Path(eval_data).is_file() else None
    rows = eval_rows(eval_path, eval_samples) if eval_path else []
    speed_set = [row["prompt"] for row in (rows or _default_speed_prompts())][:speed_prompts]
    measured = {name: v for name, v in variants.items() if name != "gguf"}
    loaded = {}
    for name, variant in measured.items():
        directory = Path(variant["path"])
        variant["file_bytes"] = file_bytes(directory / f for f in variant["files"])
        loaded[name] = load_int8(directory) if name == "int8" else _load_dir(directory)
    for name, speed in generation_speed(loaded, speed_set, speed_tokens, speed_repeats).items():
        variants[name]["speed"] = speed
    baseline_completions = None
    for name, (model, model_tokenizer) in loaded.items():
        if rows:
            acc, completions = accuracy(model, model_tokenizer, rows, max_new_tokens)
            variants[name]["accuracy"] = round(acc, 4)
            if baseline_completions is None:
                baseline_completions = completions
            else:
                same = sum(a == b for a, b in zip(completions, baseline_completions))
                variants[name]["same_completion_as_fp32"] = round(same / len(rows), 4)
    del loaded
    base_variant = variants["fp32"]
    for name, variant in variants.items():
        if name in ("fp32", "gguf"):
            continue
        variant["size_vs_fp32"] = round(variant["file_bytes"] / base_variant["file_bytes"], 4)
        variant["speed_vs_fp32"] = round(variant["speed"]["tokens_per_s"] / base_variant["speed"]["tokens_per_s"], 3)
        if "accuracy" in variant:
            delta = variant["accuracy"] - base_variant["accuracy"]
            variant["accuracy_delta"] = round(delta, 4)
            variant["tolerance"] = tolerance
            variant["within_tolerance"] = delta >= -tolerance

    report = {
        "source": source,
        "output": str(output),
        "eval": {"data": eval_path, "prompts": len(rows), "max_new_tokens": max_new_tokens, "decoding": "greedy",
                 "metric": "answer_match accuracy",
                 "tolerance": f"a variant passes if its accuracy is at most {tolerance * 100:g} points below fp32's"},
        "speed_settings": {"prompts": len(speed_set), "new_tokens": speed_tokens, "batch_size": 1,
                           "repeats": speed_repeats, "decoding": "greedy, EOS suppressed until new_tokens",
                           "order": "variants timed in turns, median round reported"},
        "environment": {"torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine,
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "variants": variants,
        "seconds": round(time.time() - started, 1),
    }
    write_json(output / "export_report.json", report)
    write_atomic(output / "export_report.md", report_markdown(report))
    return report


def _load_dir(directory: Path):
    import policies

    return policies.load(str(directory), dtype="float32", device="cpu")


def _default_speed_prompts() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}]} for a, b in
            [(3, 4), (12, 30), (25, 17), (8, 41), (33, 16), (9, 9), (40, 2), (27, 22)]]


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def report_markdown(report: dict) -> str:
    speed = report["speed_settings"]
    lines = [
        f"# Export of {report['source']['source']}",
        "",
        f"Output: `{report['output']}`" + (" (LoRA adapter merged into its base)" if report["source"]["lora_merged"] else ""),
        "",
        "| variant | weights | size | vs fp32 | tokens/s (CPU) | vs fp32 | accuracy | vs fp32 | within tolerance |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, v in report["variants"].items():
        if "file_bytes" not in v:
            lines.append(f"| {name} | {v.get('status', '')} | | | | | | | |")
            continue
        acc = f"{v['accuracy']:.1%}" if "accuracy" in v else "n/a"
        delta = f"{v['accuracy_delta'] * 100:+.1f} pts" if "accuracy_delta" in v else ""
        ok = "" if "within_tolerance" not in v else ("yes" if v["within_tolerance"] else "**no**")
        lines.append(
            f"| {name} | {', '.join(v['files'])} | {_mb(v['file_bytes'])} | {v.get('size_vs_fp32', 1.0):.2f}x | "
            f"{v['speed']['tokens_per_s']} | {v.get('speed_vs_fp32', 1.0):.2f}x | {acc} | {delta} | {ok} |"
        )
    lines += [
        "",
        f"- accuracy: {report['eval']['metric']}, {report['eval']['decoding']}, {report['eval']['prompts']} prompts "
        f"of `{report['eval']['data']}`, {report['eval']['max_new_tokens']} new tokens; {report['eval']['tolerance']}",
        f"- speed: {speed['prompts']} prompts, batch 1, {speed['new_tokens']} new tokens each, {speed['decoding']}; "
        f"variants timed in turns, median of {speed['repeats']} rounds, torch {report['environment']['torch']}, "
        f"{report['environment']['threads']} threads, quantized engine {report['environment']['quantized_engine']}, "
        f"{report['environment']['cpu_count']} CPUs with 1-minute load average {report['environment']['load_average_1min']} "
        "(timings on a busy machine are noisy)",
    ]
    for name, v in report["variants"].items():
        if v.get("note"):
            lines.append(f"- {name}: {v['note']}")
        if "linear_weight_sparsity" in v:
            lines.append(f"- {name}: {v['linear_weight_sparsity']:.1%} of the Linear weights are zero")
        if "same_completion_as_fp32" in v:
            lines.append(f"- {name}: {v['same_completion_as_fp32']:.1%} of greedy completions identical to fp32")
    if "int8" in report["variants"]:
        lines.append("- int8: load with `alignment.tools.export.load_int8(dir)` or `align chat DIR/int8` "
                     "(not `AutoModelForCausalLM.from_pretrained`)")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def cmd_export(args) -> int:
    report = export(
        args.checkpoint, args.output, merge_lora=args.merge_lora, base=args.base, int8=args.int8, prune=args.prune,
        gguf=args.gguf, eval_data=None if args.no_eval else args.eval_data, eval_samples=args.eval_samples,
        max_new_tokens=args.max_new_tokens, speed_prompts=args.speed_prompts, speed_tokens=args.speed_tokens,
        speed_repeats=args.speed_repeats, threads=args.threads or None, tolerance=args.tolerance,
    )
    print(report_markdown(report))
    print(f"report: {Path(args.output) / 'export_report.md'}")
    outside = [name for name, v in report["variants"].items() if v.get("within_tolerance") is False]
    if outside:
        print(f"warning: accuracy outside tolerance for: {', '.join(outside)}")
        if args.fail_outside_tolerance:
            return 3
    return 0


def add_parser(commands) -> None:
    p = commands.add_parser(
        "export", help="export a checkpoint: merged fp32, int8, pruned, GGUF; with a size/speed/accuracy report",
        description="Write a clean fp32 transformers directory (LoRA merged with --merge-lora) and optional "
        "int8 / pruned / GGUF variants, then measure size, CPU speed and held-out accuracy of each vs fp32.",
    )
    p.add_argument("checkpoint", help="run directory, transformers directory, or LoRA adapter (with --merge-lora)")
    p.add_argument("--output", required=True, help="export folder (the fp32 model; variants in sub-folders)")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter in CHECKPOINT into its base")
    p.add_argument("--base", help="base model for --merge-lora (default: the adapter's base_model_name_or_path)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of Linear layers (CPU)")
    p.add_argument("--prune", type=float, metavar="AMOUNT", help="global L1 magnitude pruning of this share of Linear weights")
    p.add_argument("--gguf", action="store_true", help="also write GGUF (needs the gguf package; experimental)")
    p.add_argument("--eval-data", default=DEFAULT_EVAL, help=f"held-out prompts with an 'answer' column (default {DEFAULT_EVAL})")
    p.add_argument("--eval-samples", type=int, help="use only the first N eval rows (default: all)")
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy measurement")
    p.add_argument("--max-new-tokens", type=int, default=6, help="new tokens per eval answer (default 6)")
    p.add_argument("--speed-prompts", type=int, default=8, help="prompts timed for tokens/s (default 8)")
    p.add_argument("--speed-tokens", type=int, default=32, help="new tokens per timed prompt (default 32)")
    p.add_argument("--speed-repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the whole export and its timings (default 1; 0 = torch's default)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="largest accuracy drop vs fp32 (absolute, 0.05 = 5 points) a variant may show (default 0.05)")
    p.add_argument("--fail-outside-tolerance", action="store_true", help="exit with status 3 if a variant is outside")
    p.set_defaults(func=cmd_export)
