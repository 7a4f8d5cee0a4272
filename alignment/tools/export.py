"""`align export`: turn a checkpoint into deployable artefacts, and measure what each one costs.

    align export runs/tiny/sft --output exports/tiny-sft --int8 --gguf --prune 0.3
    align export runs/lora/checkpoints/checkpoint-400 --output exports/merged --merge-lora

Always written: OUTPUT itself, a clean transformers directory in fp32
(config, ``model.safetensors``, generation config, tokenizer, nothing else);
with ``--merge-lora`` the LoRA adapter is first merged into its base (peft).
Variants, each in a sub-folder:

* ``--int8`` -> ``int8/``: torchao int8 quantisation of every ``nn.Linear`` through transformers'
  ``TorchAoConfig`` (``--int8-scheme dynamic``, the default: int8 weights and activations, the
  matmul in int8 on the CPU's int8 units; ``weight-only``: int8 weights, fp32 matmul).  A transformers
  directory: ``AutoModelForCausalLM.from_pretrained`` loads it as it is (torchao installed).
* ``--prune AMOUNT`` -> ``pruned/``: global L1 magnitude pruning of the Linear weights
  (the output embedding excluded), made permanent; a transformers directory (dense
  storage: the zeros do not make the file smaller).
* ``--gguf`` -> ``gguf/model-<type>.gguf`` for each of ``--gguf-types`` (f32, f16, bf16, q8_0)
  and an Ollama ``Modelfile`` (see :mod:`alignment.tools.gguf_export`).  The tokenizer is
  written so that llama.cpp splits text as transformers does; a tokenizer it cannot match is
  refused before anything is written.

Each export writes ``export_report.json`` and ``export_report.md``: for every variant the file
size, generation speed (greedy, batch 1, the same prompts, a fixed number of new tokens),
held-out accuracy (``answer_match`` on ``--eval-data``) and how many greedy answers are
identical to fp32's, each measured where the variant runs: transformers for the transformers
directories, llama.cpp (llama-cpp-python, when installed) for the GGUF files, through its own
tokenizer and chat template.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from alignment.errors import CheckpointError, DataError
from alignment.tools import gguf_export

LEGACY_INT8_MARKER = "quantization.json"  # written by the torch.ao int8 export this module had before torchao
DEFAULT_EVAL = "data/tiny_arith/eval.jsonl"
EXPORT_MARKER = ".align-export"  # lets a later export replace this folder
EXTRA_HINT = "pip install -c constraints-cpu.txt -e '.[export]'"

# torchao configs by scheme.  Dynamic is the default: compiled (torch.compile, static KV cache), its decode
# was 1.30x-1.67x fp32's (3 runs) on this project's CPU (AVX512-VNNI, no AMX), the only int8 variant faster in every run;
# eager, dynamic was slower than fp32 in every run, weight-only either side of it
# (benchmarks/export_speed.py; docs/tools.md has the table).
INT8_SCHEMES = {"dynamic": "Int8DynamicActivationInt8WeightConfig", "weight-only": "Int8WeightOnlyConfig"}
DEFAULT_INT8_SCHEME = "dynamic"
# Greedy answers identical to transformers' fp32 that each GGUF type is held to (share of the eval prompts).
# f32 computes what transformers computes; f16/bf16 round the weights (and llama.cpp the activations of
# f16 matmuls); q8_0 also quantises the activations to 8 bits inside llama.cpp's matmuls.
GGUF_AGREEMENT = {"f32": 0.98, "f16": 0.90, "bf16": 0.90, "q8_0": 0.90}
INT8_AGREEMENT = 0.90
# What the report tells a user about int8 speed (docs/tools.md has the measurements behind it)
INT8_SPEED_NOTE = ("torchao's CPU int8 kernels are fused only under torch.compile: run "
                   "`model.forward = torch.compile(model.forward)` and generate with `cache_implementation=\"static\"` "
                   "(`align export --compile` times it so). Eager, each layer's input is quantised and the int8 weight "
                   "re-read per call, slower than fp32. The gain needs matmuls that dominate the step: on a 107M "
                   "Llama, 1.30x-1.67x fp32 compiled; on a ~1M model, per-call overhead dominates and int8 is slower")


# ----------------------------------------------------------------------------- loading


def is_adapter(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def is_legacy_int8_export(path: Path) -> bool:
    return (Path(path) / LEGACY_INT8_MARKER).is_file() and not (Path(path) / "model.safetensors").is_file()


def quantization_method(path: Path) -> str | None:
    """The quant_method a transformers directory's config.json records (None for a plain model)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return (json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}).get("quant_method")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config}: not valid JSON ({exc})") from None


def _refuse_legacy(path: Path) -> None:
    if is_legacy_int8_export(path):
        raise CheckpointError(f"{path} is an int8 export in the old torch.ao format ({LEGACY_INT8_MARKER}, no "
                              "model.safetensors), which this version no longer reads; export again from the fp32 "
                              "checkpoint with --int8")


def load_source(spec: str, *, merge_lora: bool = False, base: str | None = None):
    """(fp32 CPU model, tokenizer, description) of the checkpoint to export."""
    import policies
    from alignment.checkpoint import require_finished_run

    path = Path(spec)
    require_finished_run(spec)
    _refuse_legacy(path)
    method = quantization_method(path)
    if method:
        raise CheckpointError(f"{spec} is already quantised ({method}, config.json quantization_config); "
                              "export from the fp32 checkpoint")
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
    """A model for inference from a checkpoint, an export (int8 included), or any spec `policies.load` takes."""
    import policies

    _refuse_legacy(Path(spec))
    return policies.load(spec)


# ----------------------------------------------------------------------------- int8 (torchao)


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def quantize_int8_dir(fp32_dir: Path, out_dir: Path, scheme: str = DEFAULT_INT8_SCHEME) -> Path:
    """torchao int8 of a saved fp32 transformers directory, written as a transformers directory.

    Quantised while loading (``from_pretrained(quantization_config=TorchAoConfig(...))``, the path
    transformers documents) and saved with safetensors; ``config.json`` records the
    ``quantization_config``, so a plain ``from_pretrained(out_dir)`` rebuilds the int8 model.
    """
    if scheme not in INT8_SCHEMES:
        raise DataError(f"--int8-scheme must be one of {', '.join(INT8_SCHEMES)}, got {scheme!r}")
    if not torchao_available():
        raise CheckpointError(f"--int8 needs torchao, which is not installed: {EXTRA_HINT}")
    import torch
    import torchao.quantization
    from transformers import AutoModelForCausalLM, TorchAoConfig

    import policies

    config = TorchAoConfig(quant_type=getattr(torchao.quantization, INT8_SCHEMES[scheme])())
    model = AutoModelForCausalLM.from_pretrained(str(fp32_dir), dtype=torch.float32, quantization_config=config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if (Path(fp32_dir) / "tokenizer_config.json").is_file():  # a bare model directory (the benchmark's) has none
        policies.load_tokenizer(str(fp32_dir)).save_pretrained(str(out_dir))
    return out_dir / "model.safetensors"



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
    from alignment.evaluation.generate import generate_completions

    prompts = [row["prompt"] for row in rows]
    samples = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    completions = [s["text"] for s in samples]
    return _answer_match(rows, completions), completions


def generation_speed(models: dict, prompts: list, new_tokens: int = 32, repeats: int = 3,
                     compiled: bool = False) -> dict:
    """CPU tokens/s of each model: greedy, batch 1, exactly `new_tokens` per prompt (EOS suppressed until then).

    `models` maps a name to (model, tokenizer).  After one warm-up generation each,
    the models are timed in turns (round-robin, `repeats` rounds) so that a change in
    machine load hits all of them alike; the median round is reported.  `compiled` times
    ``torch.compile(model.forward)`` with a static KV cache (torchao's int8 kernels are fused
    only there); every prompt is then warmed up, so compiling stays out of the timings, and
    the models get their eager forward back afterwards.
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
        if compiled:
            kwargs["cache_implementation"] = "static"  # fixed decode shapes: one compiled graph for every step
        start = time.perf_counter()
        with torch.inference_mode():
            for ids in encoded:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return time.perf_counter() - start

    inputs = {name: encode(tokenizer) for name, (_, tokenizer) in models.items()}
    timings: dict[str, list[float]] = {name: [] for name in models}
    try:
        for name, (model, tokenizer) in models.items():
            model.eval()
            if compiled:
                model.forward = torch.compile(model.forward)
            run(model, tokenizer, inputs[name] if compiled else inputs[name][:1])  # warm-up
        for _ in range(repeats):
            for name, (model, tokenizer) in models.items():
                timings[name].append(run(model, tokenizer, inputs[name]))
    finally:
        for model, _ in models.values():
            if "forward" in vars(model):
                del model.forward  # the class's eager forward again
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
    int8_scheme: str = DEFAULT_INT8_SCHEME,
    prune: float | None = None,
    gguf: bool = False,
    gguf_types: tuple[str, ...] = gguf_export.DEFAULT_GGUF_TYPES,
    eval_data: str | None = DEFAULT_EVAL,
    eval_samples: int | None = None,
    max_new_tokens: int = 6,
    speed_prompts: int = 8,
    speed_tokens: int = 32,
    speed_repeats: int = 3,
    speed_compiled: bool = False,
    threads: int | None = 1,
    tolerance: float = 0.05,
) -> dict:
    """Write the fp32 export and the asked-for variants into `output`, measure each, write the report.

    Everything runs with `threads` torch (and llama.cpp) threads (default 1: single-threaded timings
    are comparable between machines, and several threads on a busy CPU can run many times
    slower); None keeps torch's setting.
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _export(checkpoint, output, merge_lora=merge_lora, base=base, int8=int8, int8_scheme=int8_scheme,
                       prune=prune, gguf=gguf, gguf_types=tuple(gguf_types), eval_data=eval_data,
                       eval_samples=eval_samples, max_new_tokens=max_new_tokens, speed_prompts=speed_prompts,
                       speed_tokens=speed_tokens, speed_repeats=speed_repeats, speed_compiled=speed_compiled,
                       tolerance=tolerance)
    finally:
        torch.set_num_threads(previous_threads)


def _check_request(int8, int8_scheme, gguf, gguf_types) -> None:
    """Refuse what cannot be exported before anything is written."""
    if int8:
        if int8_scheme not in INT8_SCHEMES:
            raise DataError(f"--int8-scheme must be one of {', '.join(INT8_SCHEMES)}, got {int8_scheme!r}")
        if not torchao_available():
            raise CheckpointError(f"--int8 needs torchao, which is not installed: {EXTRA_HINT}")
    if gguf:
        unknown = [t for t in gguf_types if t not in gguf_export.GGUF_TYPE_NAMES]
        if unknown or not gguf_types:
            raise DataError(f"--gguf-types: {unknown or 'none given'}; choose from "
                            f"{', '.join(gguf_export.GGUF_TYPE_NAMES)}")


def _export(checkpoint, output, *, merge_lora, base, int8, int8_scheme, prune, gguf, gguf_types, eval_data,
            eval_samples, max_new_tokens, speed_prompts, speed_tokens, speed_repeats, speed_compiled, tolerance) -> dict:
    import torch

    from alignment.checkpoint import write_atomic, write_json

    _check_request(int8, int8_scheme, gguf, gguf_types)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not (output / EXPORT_MARKER).is_file():
            raise CheckpointError(f"{output} exists and is not an earlier export; choose an empty or new folder")
    started = time.time()
    model, tokenizer, source = load_source(checkpoint, merge_lora=merge_lora, base=base)
    if gguf and gguf_export.gguf_available():
        gguf_export.llama_cpp_pre_tokenizer(tokenizer)  # a tokenizer llama.cpp cannot match: refused up front
        if model.config.model_type not in gguf_export.SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"GGUF export supports {sorted(gguf_export.SUPPORTED_ARCHITECTURES)} models, "
                                  f"not {model.config.model_type!r}")
    if output.exists():
        shutil.rmtree(output)  # an earlier (or interrupted) export of ours: replaced
    output.mkdir(parents=True, exist_ok=True)
    (output / EXPORT_MARKER).write_text("written by align export\n", encoding="utf-8")
    model.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))

    eval_path = eval_data if eval_data and Path(eval_data).is_file() else None
    rows = eval_rows(eval_path, eval_samples) if eval_path else []
    speed_set = [row["prompt"] for row in (rows or _default_speed_prompts())][:speed_prompts]

    variants: dict[str, dict] = {"fp32": {"path": str(output), "files": [p.name for p in weight_files(output)],
                                          "format": "transformers", "engine": "transformers"}}
    if int8:
        weights = quantize_int8_dir(output, output / "int8", int8_scheme)
        variants["int8"] = {"path": str(output / "int8"), "files": [weights.name], "format": "transformers + torchao",
                            "engine": "transformers", "scheme": int8_scheme, "config": INT8_SCHEMES[int8_scheme],
                            "agreement_required": INT8_AGREEMENT, "speed_note": INT8_SPEED_NOTE}
    if prune:
        pruned, sparsity = prune_global_l1(model, prune)
        pruned.save_pretrained(str(output / "pruned"), safe_serialization=True)
        tokenizer.save_pretrained(str(output / "pruned"))
        variants["pruned"] = {"path": str(output / "pruned"), "files": ["model.safetensors"], "amount": prune,
                              "format": "transformers", "engine": "transformers",
                              "linear_weight_sparsity": round(sparsity, 4),
                              "note": "stored dense: zeros speed nothing up and save no space without sparse kernels"}
        del pruned
    if gguf:
        variants.update(_write_ggufs(model, tokenizer, output, gguf_types, rows))
    del model

    baseline = _measure_transformers(variants, rows, speed_set, max_new_tokens, speed_tokens, speed_repeats,
                                     speed_compiled)
    _measure_llama_cpp(variants, tokenizer, rows, speed_set, max_new_tokens, speed_tokens, speed_repeats, baseline)
    _compare_to_fp32(variants, tolerance)

    report = {
        "source": source,
        "output": str(output),
        "eval": {"data": eval_path, "prompts": len(rows), "max_new_tokens": max_new_tokens, "decoding": "greedy",
                 "metric": "answer_match accuracy",
                 "tolerance": f"a variant passes if its accuracy is at most {tolerance * 100:g} points below fp32's"},
        "speed_settings": {"prompts": len(speed_set), "new_tokens": speed_tokens, "batch_size": 1,
                           "repeats": speed_repeats, "decoding": "greedy, EOS suppressed until new_tokens",
                           "transformers_mode": "torch.compile, static KV cache" if speed_compiled else "eager",
                           "order": "transformers variants timed in turns, median round reported; "
                                    "GGUF files after them in llama.cpp"},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "packages": _versions("torchao", "gguf", "llama_cpp_python"),
                        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "variants": variants,
        "seconds": round(time.time() - started, 1),
    }
    write_json(output / "export_report.json", report)
    write_atomic(output / "export_report.md", report_markdown(report))
    return report


def _versions(*names) -> dict:
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _write_ggufs(model, tokenizer, output: Path, gguf_types, rows) -> dict:
    from alignment.evaluation.generate import render_prompt

    if not gguf_export.gguf_available():
        return {"gguf": {"status": "unavailable", "note": f"the gguf package is not installed ({EXTRA_HINT})"}}
    directory = output / "gguf"
    checked_texts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    variants = {}
    for gguf_type in gguf_types:
        path = directory / f"model-{gguf_type}.gguf"
        info = gguf_export.write_gguf(model, tokenizer, path, gguf_type, tokenizer_dir=output)
        if gguf_export.llama_cpp_available():
            info["tokenizer_check"] = gguf_export.verify_tokenizer(path, tokenizer, checked_texts)
        else:
            info["tokenizer_check"] = "not run: llama-cpp-python is not installed"
        variants[f"gguf-{gguf_type}"] = {"path": str(directory), "files": [path.name], "format": "GGUF",
                                         "engine": "llama.cpp", "agreement_required": GGUF_AGREEMENT[gguf_type],
                                         **info}
    # Ollama gets the smallest file written: the one a user would run
    preferred = next(t for t in ("q8_0", "f16", "bf16", "f32") if t in gguf_types)
    modelfile = gguf_export.write_modelfile(directory, f"model-{preferred}.gguf", tokenizer)
    variants[f"gguf-{preferred}"]["ollama_modelfile"] = str(modelfile)
    return variants


def _measure_transformers(variants, rows, speed_set, max_new_tokens, speed_tokens, speed_repeats,
                          compiled) -> list[str] | None:
    """Size, speed, accuracy of the transformers directories; returns fp32's greedy completions."""
    loaded = {}
    for name, variant in variants.items():
        if variant.get("engine") != "transformers":
            continue
        directory = Path(variant["path"])
        variant["file_bytes"] = file_bytes(directory / f for f in variant["files"])
        loaded[name] = _load_dir(directory)
    for name, speed in generation_speed(loaded, speed_set, speed_tokens, speed_repeats, compiled).items():
        variants[name]["speed"] = {**speed, "engine": "transformers"}
    baseline = None
    for name, (model, model_tokenizer) in loaded.items():
        if rows:
            acc, completions = accuracy(model, model_tokenizer, rows, max_new_tokens)
            variants[name]["accuracy"] = round(acc, 4)
            if name == "fp32":
                baseline = completions
            else:
                _record_agreement(variants[name], completions, baseline)
    return baseline


def _visible(text: str) -> str:
    """The text without U+FFFD: transformers decodes bytes that are not valid UTF-8 to it, llama-cpp-python
    drops them, so the same generated tokens read differently only there."""
    return text.replace("\ufffd", "")


def _record_agreement(variant: dict, completions: list[str], baseline: list[str]) -> None:
    same = sum(_visible(a) == _visible(b) for a, b in zip(completions, baseline))
    variant["identical_greedy_answers"] = same
    variant["identical_greedy_answers_of"] = len(baseline)
    variant["same_completion_as_fp32"] = round(same / len(baseline), 4)
    if "agreement_required" in variant:
        variant["agreement_ok"] = same / len(baseline) >= variant["agreement_required"]


def _measure_llama_cpp(variants, tokenizer, rows, speed_set, max_new_tokens, speed_tokens, speed_repeats,
                       baseline) -> None:
    """The GGUF files in llama.cpp: its tokenizer on the eval prompts, its chat path's greedy answers, its speed."""
    import torch

    from alignment.evaluation.generate import render_prompt

    for variant in variants.values():
        if variant.get("engine") != "llama.cpp":
            continue
        path = Path(variant["path"]) / variant["files"][0]
        variant["file_bytes"] = path.stat().st_size
        if not gguf_export.llama_cpp_available():
            variant["note"] = f"written; not measured: llama-cpp-python is not installed ({EXTRA_HINT})"
            continue
        llama = gguf_export.load_llama(path, threads=torch.get_num_threads())
        if rows:
            texts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
            variant["identical_token_ids"] = len(texts) - len(gguf_export.check_tokenization(llama, tokenizer, texts))
            variant["identical_token_ids_of"] = len(texts)
            completions = gguf_export.chat_answers(llama, [row["prompt"] for row in rows], max_new_tokens)
            variant["accuracy"] = round(_answer_match(rows, completions), 4)
            if baseline is not None:
                _record_agreement(variant, completions, baseline)
        variant["speed"] = gguf_export.llama_speed(llama, tokenizer, speed_set, speed_tokens, speed_repeats)
        llama.close()


def _compare_to_fp32(variants: dict, tolerance: float) -> None:
    base = variants["fp32"]
    for name, variant in variants.items():
        if name == "fp32" or "file_bytes" not in variant:
            continue
        variant["size_vs_fp32"] = round(variant["file_bytes"] / base["file_bytes"], 4)
        if "speed" in variant:
            variant["speed_vs_fp32"] = round(variant["speed"]["tokens_per_s"] / base["speed"]["tokens_per_s"], 3)
        if "accuracy" in variant and "accuracy" in base:
            delta = variant["accuracy"] - base["accuracy"]
            variant["accuracy_delta"] = round(delta, 4)
            variant["tolerance"] = tolerance
            variant["within_tolerance"] = delta >= -tolerance


def _answer_match(rows: list[dict], completions: list[str]) -> float:
    import reward

    prompts = [row["prompt"] for row in rows]
    scored = reward.build([{"source": "answer_match"}])(prompts, completions, answer=[row["answer"] for row in rows])
    applied = [s for s in scored.per_source["answer_match"] if s is not None]
    return sum(applied) / len(applied) if applied else float("nan")


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
        "| variant | weights | run in | size | vs fp32 | tokens/s (CPU) | vs fp32 | accuracy | vs fp32 | "
        "identical greedy answers | within tolerance |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, v in report["variants"].items():
        if "file_bytes" not in v:
            lines.append(f"| {name} | {v.get('status', '')} | | | | | | | | | |")
            continue
        acc = f"{v['accuracy']:.1%}" if "accuracy" in v else "n/a"
        delta = f"{v['accuracy_delta'] * 100:+.1f} pts" if "accuracy_delta" in v else ""
        ok = "" if "within_tolerance" not in v else ("yes" if v["within_tolerance"] else "**no**")
        same = (f"{v['identical_greedy_answers']} of {v['identical_greedy_answers_of']}"
                if "identical_greedy_answers" in v else "")
        tokens = v["speed"]["tokens_per_s"] if "speed" in v else "n/a"
        ratio = f"{v['speed_vs_fp32']:.2f}x" if "speed_vs_fp32" in v else ("1.00x" if name == "fp32" else "")
        lines.append(
            f"| {name} | {', '.join(v['files'])} | {v['engine']} | {_mb(v['file_bytes'])} | "
            f"{v.get('size_vs_fp32', 1.0):.2f}x | {tokens} | {ratio} | {acc} | {delta} | {same} | {ok} |"
        )
    lines += [
        "",
        f"- accuracy: {report['eval']['metric']}, {report['eval']['decoding']}, {report['eval']['prompts']} prompts "
        f"of `{report['eval']['data']}`, {report['eval']['max_new_tokens']} new tokens; {report['eval']['tolerance']}",
        f"- speed: {speed['prompts']} prompts, batch 1, {speed['new_tokens']} new tokens each, {speed['decoding']}; "
        f"{speed['order']}, median of {speed['repeats']} rounds, transformers {speed['transformers_mode']}, "
        f"torch {report['environment']['torch']}, "
        f"{report['environment']['threads']} threads, {report['environment']['cpu_count']} CPUs with 1-minute load "
        f"average {report['environment']['load_average_1min']} (timings on a busy machine are noisy)",
    ]
    for name, v in report["variants"].items():
        if "identical_greedy_answers" in v:
            lines.append(f"- {name}: identical greedy answers: {v['identical_greedy_answers']} of "
                         f"{v['identical_greedy_answers_of']} (held to {v.get('agreement_required', 0):.0%}: "
                         f"{'met' if v.get('agreement_ok', True) else '**not met**'})")
        if "identical_token_ids" in v:
            lines.append(f"- {name}: llama.cpp token ids identical to transformers' on {v['identical_token_ids']} of "
                         f"{v['identical_token_ids_of']} rendered prompts (pre-tokenizer `{v['pre_tokenizer']}`)")
        if v.get("note"):
            lines.append(f"- {name}: {v['note']}")
        for caveat in v.get("caveats", []):
            lines.append(f"- {name}: caveat: {caveat}")
        if "linear_weight_sparsity" in v:
            lines.append(f"- {name}: {v['linear_weight_sparsity']:.1%} of the Linear weights are zero")
        if "ollama_modelfile" in v:
            lines.append(f"- {name}: Ollama: `ollama create NAME -f {v['ollama_modelfile']}`")
    if "int8" in report["variants"]:
        lines.append(f"- int8: torchao `{report['variants']['int8']['config']}`; loads with "
                     "`AutoModelForCausalLM.from_pretrained(DIR/int8)` (torchao installed)")
        lines.append(f"- int8 speed: {INT8_SPEED_NOTE}")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def cmd_export(args) -> int:
    report = export(
        args.checkpoint, args.output, merge_lora=args.merge_lora, base=args.base, int8=args.int8,
        int8_scheme=args.int8_scheme, prune=args.prune, gguf=args.gguf, gguf_types=args.gguf_types,
        eval_data=None if args.no_eval else args.eval_data, eval_samples=args.eval_samples,
        max_new_tokens=args.max_new_tokens, speed_prompts=args.speed_prompts, speed_tokens=args.speed_tokens,
        speed_repeats=args.speed_repeats, speed_compiled=args.compile, threads=args.threads or None,
        tolerance=args.tolerance,
    )
    print(report_markdown(report))
    print(f"report: {Path(args.output) / 'export_report.md'}")
    outside = [name for name, v in report["variants"].items()
               if v.get("within_tolerance") is False or v.get("agreement_ok") is False]
    if outside:
        print(f"warning: accuracy or agreement with fp32 outside tolerance for: {', '.join(outside)}")
        if args.fail_outside_tolerance:
            return 3
    return 0


def _type_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip().lower() for item in text.split(",") if item.strip())


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
    p.add_argument("--int8", action="store_true", help="torchao int8 quantisation of Linear layers (needs torchao)")
    p.add_argument("--int8-scheme", choices=list(INT8_SCHEMES), default=DEFAULT_INT8_SCHEME,
                   help=f"dynamic: int8 weights and activations; weight-only: int8 weights (default {DEFAULT_INT8_SCHEME})")
    p.add_argument("--prune", type=float, metavar="AMOUNT", help="global L1 magnitude pruning of this share of Linear weights")
    p.add_argument("--gguf", action="store_true", help="also write GGUF files and an Ollama Modelfile (needs gguf)")
    p.add_argument("--gguf-types", type=_type_list, default=gguf_export.DEFAULT_GGUF_TYPES,
                   help=f"comma list of {','.join(gguf_export.GGUF_TYPE_NAMES)} "
                   f"(default {','.join(gguf_export.DEFAULT_GGUF_TYPES)})")
    p.add_argument("--eval-data", default=DEFAULT_EVAL, help=f"held-out prompts with an 'answer' column (default {DEFAULT_EVAL})")
    p.add_argument("--eval-samples", type=int, help="use only the first N eval rows (default: all)")
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy measurement")
    p.add_argument("--max-new-tokens", type=int, default=6, help="new tokens per eval answer (default 6)")
    p.add_argument("--speed-prompts", type=int, default=8, help="prompts timed for tokens/s (default 8)")
    p.add_argument("--speed-tokens", type=int, default=32, help="new tokens per timed prompt (default 32)")
    p.add_argument("--speed-repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    p.add_argument("--compile", action="store_true",
                   help="time the transformers variants under torch.compile with a static KV cache (where torchao's "
                   "int8 pays off; compiling takes a while, outside the timings)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and llama.cpp threads for the whole export and its timings (default 1; 0 = torch's default)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="largest accuracy drop vs fp32 (absolute, 0.05 = 5 points) a variant may show (default 0.05)")
    p.add_argument("--fail-outside-tolerance", action="store_true",
                   help="exit with status 3 if a variant is outside its accuracy tolerance or agreement with fp32")
    p.set_defaults(func=cmd_export)
