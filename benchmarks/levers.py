"""Speed levers, measured: correctness of padding-free batches, thread settings, torch.compile, LM head.

    python -m benchmarks.levers padding-free [--preset 1m]     # is padding-free exact here? (JSON)
    python -m benchmarks.levers step --preset 20m --repeats 3  # one SFT-shaped train step under variants

``padding-free`` compares per-token log-probs of the same SFT rows computed
(a) as a right-padded batch with an attention mask and (b) concatenated into
one row with restarting ``position_ids`` and no mask, the way trl's
``padding_free=True`` collator feeds the model, for each attention
implementation, with ``use_cache`` off (as trl's SFT sets it) and on.

``step`` times a full training step (forward, loss on completion tokens,
backward, AdamW) on a real SFT batch of the demo data, each variant in a fresh
process, variants alternated ``repeats`` times; it reports tokens per median
step time per variant (two warm-up steps excluded) and the ratio to ``padded``
of the same repeat:

* ``padded``: the batch as trl's default collator pads it (what ours runs now);
* ``padding_free``: the same rows as one row with position ids;
* ``label_logits``: padded, but the LM head and loss only at positions with a label;
* ``compiled``: ``torch.compile(model)``, padded (compile time reported apart);
* ``threads1``: padded, ``torch.set_num_threads(1)``;
* ``spin``: padded, with ``OMP_WAIT_POLICY`` removed from the environment
  (libgomp's default: idle threads spin before sleeping).

``--env NAME=VALUE`` applies to every variant (e.g. ``OMP_WAIT_POLICY=PASSIVE``,
which ``spin`` then removes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("padded", "padding_free", "label_logits", "compiled", "threads1", "spin")


def sft_batch(tokenizer, rows: int, offset: int = 0):
    """`rows` SFT examples of the demo data: token ids and completion masks (the loss positions)."""
    from benchmarks.workloads import DATA

    examples = []
    with open(DATA / "sft.jsonl", encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if i < offset:
                continue
            row = json.loads(line)
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            examples.append((f_ids, [0] * len(p_ids) + [1] * (len(f_ids) - len(p_ids))))
            if len(examples) == rows:
                break
    return examples


def padded(examples, pad_id):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for i, (row, loss) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.where(torch.tensor(loss) == 1, torch.tensor(row), torch.tensor(-100))
    return ids, mask, labels


def flattened(examples):
    import torch

    ids = torch.tensor([t for row, _ in examples for t in row]).unsqueeze(0)
    positions = torch.tensor([p for row, _ in examples for p in range(len(row))]).unsqueeze(0)
    labels = torch.tensor([t if m else -100 for row, loss in examples for t, m in zip(row, loss)]).unsqueeze(0)
    # the first token of each row predicts nothing from the row before it
    starts = torch.tensor([p == 0 for p in positions[0].tolist()])
    return ids, positions, labels, starts


# ------------------------------------------------------------------------------------ padding-free check


def padding_free_check(preset: str = "1m", rows: int = 16) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from policies.tiny import build_tiny_model, load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    examples = sft_batch(tokenizer, rows)
    ids, mask, _ = padded(examples, tokenizer.pad_token_id)
    flat_ids, positions, _, _ = flattened(examples)
    base = build_tiny_model(preset, tokenizer, seed=0)
    results = {}
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_config(base.config, attn_implementation=attn)
        model.load_state_dict(base.state_dict())
        model.eval()
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ref_rows = torch.cat([ref[i, : len(r)] for i, (r, _) in enumerate(examples)])
            for cache in (False, True):
                out = model(input_ids=flat_ids, position_ids=positions, use_cache=cache).logits[0]
                diff = (out.log_softmax(-1) - ref_rows.log_softmax(-1)).abs().max().item()
                results[f"{attn}/use_cache={cache}"] = {"max_abs_logprob_diff": diff, "exact": diff < 1e-4}
    return {"preset": preset, "rows": rows, "results": results}


# ------------------------------------------------------------------------------------ step timing


def _step_child(preset: str, variant: str, batch: int, steps: int) -> dict:
    """One variant's train steps in this process (called in a fresh subprocess)."""
    import torch

    from policies.tiny import build_tiny_model, load_tiny_tokenizer

    if variant == "threads1":
        torch.set_num_threads(1)
    tokenizer = load_tiny_tokenizer()
    model = build_tiny_model(preset, tokenizer, seed=0)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = model
    compile_seconds = None
    if variant == "compiled":
        forward = torch.compile(model)
    batches = [sft_batch(tokenizer, batch, offset=i * batch) for i in range(steps + 2)]
    head = model.get_output_embeddings()

    def loss_of(examples):
        if variant == "padding_free":
            ids, positions, labels, _ = flattened(examples)
            logits = forward(input_ids=ids, position_ids=positions, use_cache=False).logits
            return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        ids, mask, labels = padded(examples, tokenizer.pad_token_id)
        if variant == "label_logits":
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != -100
            logits = head(hidden[:, :-1][keep])
            return torch.nn.functional.cross_entropy(logits, targets[keep])
        logits = forward(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)

    times, tokens = [], 0
    for i, examples in enumerate(batches):
        start_step = time.perf_counter()
        loss = loss_of(examples)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start_step
        if variant == "compiled" and i == 0:
            compile_seconds = elapsed
        if i >= 2:  # two warm-up steps (allocator, compile)
            times.append(elapsed)
            tokens += sum(len(r) for r, _ in examples)
    tokens_per_step = tokens / len(times)
    median = statistics.median(times)
    return {"variant": variant, "preset": preset, "batch": batch, "median_step_s": median,
            "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / median,
            "first_step_s": compile_seconds, "loss": float(loss), "threads": torch.get_num_threads()}


def step_levers(presets, variants, repeats: int, batch: int, steps: int, extra_env=None, log=print) -> dict:
    env_base = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    runs = []
    for preset in presets:
        for repeat in range(repeats):
            for variant in variants:
                env = dict(env_base)
                if variant == "spin":
                    env.pop("OMP_WAIT_POLICY", None)
                cmd = [sys.executable, "-m", "benchmarks.levers", "_step", "--preset", preset, "--variant", variant,
                       "--batch", str(batch), "--steps", str(steps)]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    runs.append({"variant": variant, "preset": preset, "error": proc.stderr[-1500:]})
                    log(f"[lever] {preset} {variant} #{repeat}: error {proc.stderr[-300:]}")
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["repeat"] = repeat
                runs.append(result)
                log(f"[lever] {preset} {variant:<13} #{repeat}: {result['tokens_per_s']:,.0f} tok/s "
                    f"(step {result['median_step_s'] * 1000:.0f} ms)")
    summary = {}
    for preset in presets:
        base = [r for r in runs if r["preset"] == preset and r.get("variant") == "padded" and "error" not in r]
        for variant in variants:
            mine = [r for r in runs if r["preset"] == preset and r.get("variant") == variant and "error" not in r]
            if not mine:
                continue
            ratios = [m["tokens_per_s"] / b["tokens_per_s"] for m in mine for b in base if b["repeat"] == m["repeat"]]
            summary[f"{preset}/{variant}"] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                "vs_padded": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
                if ratios else None,
            }
    return {"runs": runs, "summary": summary, "env": extra_env or {}, "load_average": os.getloadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("padding-free")
    check.add_argument("--preset", default="1m")
    step = commands.add_parser("step")
    step.add_argument("--preset", default="1m")
    step.add_argument("--variants", default=",".join(VARIANTS))
    step.add_argument("--repeats", type=int, default=3)
    step.add_argument("--batch", type=int, default=64)
    step.add_argument("--steps", type=int, default=8)
    step.add_argument("--output", default=None)
    step.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    child = commands.add_parser("_step")
    child.add_argument("--preset", required=True)
    child.add_argument("--variant", required=True, choices=VARIANTS)
    child.add_argument("--batch", type=int, required=True)
    child.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "padding-free":
        print(json.dumps(padding_free_check(args.preset), indent=1))
    elif args.command == "_step":
        print(json.dumps(_step_child(args.preset, args.variant, args.batch, args.steps)))
    else:
        result = step_levers(args.preset.split(","), args.variants.split(","), args.repeats, args.batch, args.steps,
                             dict(item.split("=", 1) for item in args.env))
        text = json.dumps(result, indent=1)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text)
        print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
