"""The machine's matmul ceiling, measured: the denominator of model FLOPs utilisation.

    python -m benchmarks.ceiling            # prints JSON

Matmuls of several shapes (``SHAPES``: square 1024 and 2048, and 2048-wide
products with a 512 inner or outer side, the shapes of a transformer's
projections) on the CPU with all of torch's threads, repeated, in fp32 and in
bf16; each trial times ``repeats`` products (2 m k n FLOPs each), the best
trial of a shape is that shape's rate, and the best shape is the ceiling.
Why several: one square product understated fp32 on an AMD EPYC (Zen 5) by
up to 10% (a 2048 x 2048 x 512 product ran faster than 2048 cubed, and fp32 SFT
then measured above "the ceiling"); the best of several is closer to what the
precision can ever do.  A run's MFU is taken against the ceiling of the
precision it computed in (``precision:``, alignment/precision.py): a bf16 run
against the bf16 ceiling, which on a CPU with AMX-BF16 or AVX512-BF16 is
several times fp32's (and on one without, far below it).  With a CUDA GPU
present, bf16 on the GPU is measured too (square 4096).
"""

from __future__ import annotations

import json
import time

SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (2048, 2048, 512), (2048, 512, 2048))


def matmul_gflops(n: int = 2048, repeats: int = 5, trials: int = 5, dtype: str = "float32", device: str = "cpu",
                  shape: tuple[int, int, int] | None = None) -> dict:
    """Best rate of ``(m x k) @ (k x n)`` products over ``trials`` timings of ``repeats`` products each."""
    import torch

    m, k, n = shape or (n, n, n)
    dt = getattr(torch, dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device=device, dtype=dt)
    b = torch.randn(k, n, generator=generator).to(device=device, dtype=dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up (allocations, kernel selection)
    sync()
    best, all_trials = 0.0, []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        seconds = time.perf_counter() - start
        gflops = 2 * m * k * n * repeats / seconds / 1e9
        all_trials.append(round(gflops, 2))
        best = max(best, gflops)
    return {"dtype": dtype, "device": device, "shape": [m, k, n], "repeats": repeats,
            "threads": torch.get_num_threads(), "best_gflops": round(best, 2), "trials_gflops": all_trials}


def best_over_shapes(shapes=SHAPES, repeats: int = 2, trials: int = 10, dtype: str = "float32") -> dict:
    """The fastest shape's result, with every shape's best rate under ``shapes_gflops``."""
    results = [matmul_gflops(repeats=repeats, trials=trials, dtype=dtype, shape=shape) for shape in shapes]
    best = max(results, key=lambda result: result["best_gflops"])
    return {**best, "shapes_gflops": {"x".join(map(str, r["shape"])): r["best_gflops"] for r in results}}


def measure(repeats: int = 2, trials: int = 10, shapes=SHAPES) -> dict:
    """fp32 and bf16 CPU ceilings (always) and the bf16 GPU ceiling (when a CUDA device is present)."""
    import torch

    result = {"cpu_fp32": best_over_shapes(shapes, repeats, trials),
              "cpu_bf16": best_over_shapes(shapes, repeats, trials, "bfloat16")}
    result["cpu_bf16_over_fp32"] = round(result["cpu_bf16"]["best_gflops"] / result["cpu_fp32"]["best_gflops"], 2)
    if torch.cuda.is_available():
        result["gpu_bf16"] = matmul_gflops(4096, 20, trials, dtype="bfloat16", device="cuda")
        result["gpu_name"] = torch.cuda.get_device_name(0)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="measure the matmul ceiling")
    parser.add_argument("--n", type=int, default=0, help="one square n x n product instead of SHAPES")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(measure(args.repeats, args.trials, ((args.n,) * 3,) if args.n else SHAPES)))
