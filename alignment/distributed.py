"""Which process writes: under `accelerate launch` / `torchrun` every process runs the stage code.

Only the main process (global rank 0) writes run-directory files and runs the
held-out checks; the others wait at a barrier so nobody reads a half-written
directory.
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def wait_for_everyone() -> None:
    """A barrier when a process group is up; a no-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
