"""Decode speed of the int8 exports against fp32, on this CPU: a table and the ratio.

    python -m benchmarks export-speed                         # ~110M-parameter Llama, 1 thread
    python -m benchmarks export-speed --size 20m --threads 2 --repeats 5

A random-init Llama of the chosen size is built from a config (no download), saved in fp32,
and exported by ``align export``'s own int8 function for each torchao scheme; each directory is
then loaded with plain ``AutoModelForCausalLM.from_pretrained``.  Decode is timed greedy, batch 1,
exactly ``--tokens`` new tokens after a 16-token prompt (EOS suppressed), the variants in turns
for ``--repeats`` rounds (so a change in machine load hits all alike); min / median / max tokens/s
and the median's ratio to fp32 are printed, in two modes: eager, and compiled
(``model.forward = torch.compile(model.forward)`` with a static KV cache, torchao's CPU path:
inductor fuses the int8 kernels; the first call compiles, its time is shown apart).  Random weights are fine for speed: the work per
token does not depend on the values.  This is a benchmark, not a test: the numbers depend on
the CPU and its load, and the header names the CPU's int8 units (AVX512-VNNI, AMX-INT8).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden, intermediate, layers, heads, vocab
    "1m": (128, 512, 4, 4, 285),
    "20m": (512, 1376, 6, 8, 4096),
    "110m": (1024, 2816, 8, 16, 4096),
}
INT8_UNITS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")


def cpu_description() -> dict:
    import os

    import torch

    from benchmarks.efficacy import cpu_flags, cpuinfo_field

    flags = set(cpu_flags())
    # the kernel path torch and oneDNN actually take: ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA can hold a CPU
    # below its flags (e.g. AVX2 on an AVX-512 VNNI machine), which is how "a CPU without int8 units" is checked here
    forced = {name: os.environ[name] for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
              if os.environ.get(name)}
    return {"cpu": cpuinfo_field("model name"), "int8_units": [f for f in INT8_UNITS if f in flags],
            "kernel_path": torch.backends.cpu.get_cpu_capability(), "forced_isa": forced}


def build_model(size: str, directory: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, intermediate, layers, heads, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def _generate_kwargs(tokens: int, compiled: bool) -> dict:
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                  temperature=None, top_k=None, top_p=None)
    if compiled:
        # a static KV cache keeps the decode step's shapes fixed, so the compiled graph is reused every token
        kwargs["cache_implementation"] = "static"
    return kwargs


def decode_speed(models: dict, tokens: int, repeats: int, compiled: bool = False) -> tuple[dict, dict, dict]:
    """(tokens/s per round, the greedy ids of each, warm-up seconds) for each model, timed in turns."""
    import torch

    prompt = torch.arange(5, 21).unsqueeze(0)
    kwargs = _generate_kwargs(tokens, compiled)
    timings: dict[str, list[float]] = {name: [] for name in models}
    outputs, warmup = {}, {}
    with torch.inference_mode():
        for name, model in models.items():
            start = time.perf_counter()  # the first call compiles (prefill and decode graphs)
            outputs[name] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)[0]
            warmup[name] = round(time.perf_counter() - start, 1)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
                timings[name].append(tokens / (time.perf_counter() - start))
    return timings, outputs, warmup


def run(size: str = "110m", threads: int = 1, tokens: int = 32, repeats: int = 5,
        schemes: tuple[str, ...] = ("dynamic", "weight-only"), modes: tuple[str, ...] = ("eager", "compiled")) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from alignment.tools.export import quantize_int8_dir

    torch.set_num_threads(threads)
    rows, reference = {}, None
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        root = Path(tmp)
        parameters = build_model(size, root / "fp32")
        directories = {"fp32": root / "fp32"}
        for scheme in schemes:
            quantize_int8_dir(root / "fp32", root / scheme, scheme)
            directories[f"int8 {scheme}"] = root / scheme
        for mode in modes:
            # plain from_pretrained: the quantization_config in config.json rebuilds the torchao int8 layers
            models = {name: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
                      for name, d in directories.items()}
            if mode == "compiled":
                for model in models.values():
                    model.forward = torch.compile(model.forward)
            timings, outputs, warmup = decode_speed(models, tokens, repeats, compiled=mode == "compiled")
            reference = reference if reference is not None else outputs
            base = statistics.median(timings["fp32"])
            for name, t in timings.items():
                rows[f"{name} ({mode})"] = {
                    "min": round(min(t), 2), "median": round(statistics.median(t), 2), "max": round(max(t), 2),
                    "ratio_vs_fp32": round(statistics.median(t) / base, 3), "warmup_s": warmup[name],
                    "file_mb": round((directories[name] / "model.safetensors").stat().st_size / 1e6, 1),
                    # the greedy ids of this run against the same variant's first (eager) run
                    "same_ids_as_eager": bool(torch.equal(outputs[name], reference[name])),
                    "same_ids_as_fp32": bool(torch.equal(outputs[name], reference["fp32"])),
                }
            del models
    return {"size": size, "parameters": parameters, "threads": threads, "new_tokens": tokens, "repeats": repeats,
            "torch": torch.__version__, **cpu_description(), "variants": rows,
            "ratio": "median tokens/s over fp32's in the same mode (eager vs eager, compiled vs compiled)"}


def table(report: dict) -> str:
    lines = [f"# Decode speed, {report['size']} Llama ({report['parameters'] / 1e6:.0f}M parameters), "
             f"{report['threads']} thread(s), {report['new_tokens']} new tokens, {report['repeats']} rounds",
             f"CPU: {report['cpu']}; int8 units: {', '.join(report['int8_units']) or 'none'}; kernel path "
             f"{report.get('kernel_path')}{' (forced: ' + str(report['forced_isa']) + ')' if report.get('forced_isa') else ''}; "
             f"torch {report['torch']}",
             "", "| variant | file | tokens/s min | median | max | median vs fp32 (same mode) | first call | "
             "greedy ids = eager | = fp32 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, row in report["variants"].items():
        lines.append(f"| {name} | {row['file_mb']} MB | {row['min']} | {row['median']} | {row['max']} | "
                     f"{row['ratio_vs_fp32']:.2f}x | {row['warmup_s']} s | {row['same_ids_as_eager']} | "
                     f"{row['same_ids_as_fp32']} |")
    return "\n".join(lines)


def main(args) -> int:
    report = run(args.size, args.threads, args.tokens, args.repeats, tuple(args.schemes), tuple(args.modes))
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0
