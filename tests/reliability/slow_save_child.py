"""`python tests/reliability/slow_save_child.py SECONDS@STEP align-args...`: the `align` CLI with one checkpoint
write paused, so a test can kill the process in the middle of it.

The pause comes after the weights, optimizer and scheduler are written and before the RNG state and
trainer_state.json (transformers' `Trainer._save_rng_state`, patched here in the child process only; the
toolkit itself has no test hook), and is announced on stdout.
"""

import sys
import time
from pathlib import Path


def pause_checkpoint_write(seconds: float, step: str) -> None:
    import transformers

    original = transformers.Trainer._save_rng_state

    def slow_save_rng_state(self, output_dir, *args, **kwargs):
        if not step or Path(output_dir).name == f"checkpoint-{step}":
            print(f"SLOW_SAVE: writing {output_dir}", flush=True)
            time.sleep(seconds)
        return original(self, output_dir, *args, **kwargs)

    transformers.Trainer._save_rng_state = slow_save_rng_state


if __name__ == "__main__":
    seconds, _, at_step = sys.argv[1].partition("@")
    pause_checkpoint_write(float(seconds), at_step)
    from alignment.cli import main

    sys.exit(main(sys.argv[2:]))
