#!/usr/bin/env bash
# The GPU benchmark in one run of at most 10 minutes: SFT, DPO, GRPO and PPO (vLLM rollouts) of a
# Qwen2-0.5B-shaped model built from a config, ours vs trl, bf16 (benchmarks/gpu.py, benchmarks/README.md).
#
#   bash benchmarks/gpu.sh [--output DIR]        # on a machine without a CUDA GPU: one line, exit 0
#   bash benchmarks/gpu.sh --dry-run-cpu         # the same code path on the CPU (tiny shape, 1-2 steps)
#
# Exit codes: 0 = every run that could run ran, or there is no GPU (nothing to do is not a failure);
# 1 = a run failed (the table says which and why); 124 = the 10-minute limit below was hit.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
# gpu.py keeps its own 570 s deadline; this outer limit only catches a hang it cannot see (e.g. a stuck import)
exec timeout 600 "$python" -m benchmarks gpu "$@"
