"""The machine's matmul ceiling, measured: the denominator of model FLOPs utilisation.

    python -m benchmarks.ceiling            # prints JSON

``n x n @ n x n`` matmuls (n = 2048 by default) on the CPU with all of
torch's threads, repeated, in fp32 and in bf16; each trial times ``repeats``
products and the best trial counts (2 n^3 FLOPs a product).  A run's MFU is
taken against the ceiling of the precision it computed in (``precision:``,
alignment/precision.py): a bf16 run against the bf16 ceiling, which on a CPU
with AMX-BF16 or AVX512-BF16 is several times fp32's (and on one without, far
below it).  With a CUDA GPU present, bf16 on the GPU is measured too.
"""

from __future__ import annotations

import json
import time


def matmul_gflops(n: int = 2048, repeats: int = 5, trials: int = 5, dtype: str = "float32", device: str = "cpu") -> dict:
    import torch

    dt = getattr(torch, dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dt)
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
        gflops = 2 * n**3 * repeats / seconds / 1e9
        all_trials.append(round(gflops, 2))
        best = max(best, gflops)
    return {"dtype": dtype, "device": device, "n": n, "repeats": repeats, "threads": torch.get_num_threads(),
            "best_gflops": round(best, 2), "trials_gflops": all_trials}


def measure(n: int = 2048, repeats: int = 2, trials: int = 10) -> dict:
    """fp32 and bf16 CPU ceilings (always) and the bf16 GPU ceiling (when a CUDA device is present)."""
    import torch

    result = {"cpu_fp32": matmul_gflops(n, repeats, trials), "cpu_bf16": matmul_gflops(n, repeats, trials, "bfloat16")}
    result["cpu_bf16_over_fp32"] = round(result["cpu_bf16"]["best_gflops"] / result["cpu_fp32"]["best_gflops"], 2)
    if torch.cuda.is_available():
        result["gpu_bf16"] = matmul_gflops(max(n, 4096), 20, trials, dtype="bfloat16", device="cuda")
        result["gpu_name"] = torch.cuda.get_device_name(0)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="measure the matmul ceiling")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(measure(args.n, args.repeats, args.trials)))
