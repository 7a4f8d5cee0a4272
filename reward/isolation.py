"""Run an untrusted reward source in a separate process with a time and memory limit.

This is a **resource limit, not a sandbox**: the child runs with the trainer's
user, can read and write every file that user can, and can use the network.
What it guarantees:

* nothing the child sends back is unpickled: results arrive as JSON, and only
  a list of numbers or nulls is accepted (an object with a crafted
  ``__reduce__`` cannot run code in the trainer);
* the child starts in its own session and process group, and a timeout, a
  crash or ``close()`` kills the whole group, so processes it started die with
  it (a grandchild that starts a session of its own escapes this);
* the child gets a scrubbed environment: only ``SAFE_ENVIRONMENT`` variables
  (paths, locale, thread counts, offline switches), never tokens or keys;
  pass what a source needs through ``kwargs``;
* the child limits its own address space (``RLIMIT_AS``) before it imports
  the source, and a call that overruns the wall-clock timeout is killed.

The child is ``python -m reward.isolation`` started with ``subprocess``
(not multiprocessing, whose spawn copies the whole environment and pickles
both ways); it reads requests and writes replies as JSON lines on two pipes of
its own, so whatever the source prints goes to the trainer's output unharmed.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

from reward.base import data_columns
from reward.errors import RewardError

logger = logging.getLogger(__name__)

# Environment variables the child inherits; everything else (HF_TOKEN, API keys, cloud credentials) stays behind.
SAFE_ENVIRONMENT = (
    "PATH", "HOME", "USER", "LANG", "LANGUAGE", "TMPDIR", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "VIRTUAL_ENV",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
)


def scrubbed_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the SAFE_ENVIRONMENT variables (and LC_*) of `environ`, nothing else."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k in SAFE_ENVIRONMENT or k.startswith("LC_")}


def checked_scores(value: Any, n: int) -> list[float | None]:
    """The child's reply decoded from JSON must be a list of n numbers or nulls; anything else is refused.

    (NaN arrives as a float and is refused later by RewardSource, as from any source: never read as 0.)
    """
    if not isinstance(value, list) or len(value) != n:
        raise ValueError(f"expected a JSON list of {n} scores, got {type(value).__name__}"
                         + (f" of {len(value)}" if isinstance(value, list) else ""))
    for i, score in enumerate(value):
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
            raise ValueError(f"score {i} is a {type(score).__name__}, not a number or null")
    return [None if s is None else float(s) for s in value]


# ----------------------------------------------------------------------------- the child


def _as_json_scores(result: Any) -> list[float | None]:
    """What the child may send: plain numbers (NaN and inf pass, as floats, for the parent to refuse)."""
    out = []
    for i, score in enumerate(result):
        if score is None:
            out.append(None)
        elif isinstance(score, bool) or not isinstance(score, int | float):
            try:  # numpy / torch scalars
                out.append(float(score.item()))
            except Exception:  # noqa: BLE001 - anything else is refused here, before it leaves the child
                raise TypeError(f"score {i} is a {type(score).__name__}, not a number") from None
        else:
            out.append(float(score))
    return out


def _child_main(read_fd: int, write_fd: int) -> None:
    """Child: read the set-up line, limit memory, resolve the source, then answer one JSON line per call."""
    reader, writer = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")

    def reply(status: str, detail: Any = None) -> None:
        writer.write(json.dumps({"status": status, "detail": detail}).encode() + b"\n")
        writer.flush()

    try:
        setup = json.loads(reader.readline())
        sys.path[:] = setup["sys_path"]  # what the trainer could import, the child can
        if setup["memory_mb"]:
            import resource

            limit = int(setup["memory_mb"]) * 1024 * 1024
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        from reward.base import _await, call_arguments, call_plan
        from reward.registry import resolve

        fn = resolve(setup["source"], **setup["kwargs"])
        plan = call_plan(fn)  # called as in the parent: by keyword, as trl calls reward functions
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        reply("error", f"{type(exc).__name__}: {exc}")
        return
    reply("ready")
    for line in reader:
        request = json.loads(line)
        try:
            offered = {"prompts": request["prompts"], "completions": request["completions"], **request["columns"]}
            args, kwargs = call_arguments(plan, offered, setup["source"])
            result = _as_json_scores(_await(fn(*args, **kwargs)))
            reply("ok", result)
        except MemoryError:
            reply("memory")
            return
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            reply("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}")


# ----------------------------------------------------------------------------- the parent


class _ChildGone(Exception):
    pass


class IsolatedReward:
    """A reward source run in a child process with a timeout and a memory cap (see the module docstring).

    Args:
        source_string: any source `reward.registry.resolve` accepts; resolved in the child.
        timeout: wall-clock seconds per call; on overrun the child's process group is killed.
        memory_mb: address-space limit of the child (RLIMIT_AS), or None for no limit.
            It bounds virtual memory, so leave room for the interpreter and
            libraries (a few hundred MB; more with numpy/torch).
        kwargs: keyword arguments for `resolve`, e.g. ``{"pattern": "..."}`` (JSON values).
        start_timeout: seconds the child may take to start and resolve the source.
    """

    def __init__(
        self,
        source_string: str,
        timeout: float = 60.0,
        memory_mb: int | None = 2048,
        kwargs: dict[str, Any] | None = None,
        start_timeout: float = 120.0,
    ):
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise RewardError(f"isolated reward '{source_string}': timeout must be > 0, got {timeout!r}")
        if memory_mb is not None and not (isinstance(memory_mb, int) and memory_mb > 0):
            raise RewardError(
                f"isolated reward '{source_string}': memory_mb must be a positive integer, got {memory_mb!r}"
            )
        self.source = source_string
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.kwargs = dict(kwargs or {})
        self.start_timeout = float(start_timeout)
        self._proc: subprocess.Popen | None = None
        self._to_child = self._from_child = None
        self._buffer = b""
        self._start()

    def __repr__(self) -> str:
        return f"IsolatedReward({self.source!r}, timeout={self.timeout}, memory_mb={self.memory_mb})"

    @property
    def pid(self) -> int | None:
        """The child's process id (None when no child is running)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: an unpickled copy starts its own child on its first call."""
        keys = ("source", "timeout", "memory_mb", "kwargs", "start_timeout")
        return {k: getattr(self, k) for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._proc = self._to_child = self._from_child = None
        self._buffer = b""

    # -- the pipe protocol -----------------------------------------------

    def _send(self, message: dict) -> None:
        os.write(self._to_child, json.dumps(message).encode() + b"\n")

    def _receive(self, timeout: float) -> dict | None:
        """The child's next JSON line; None on timeout; _ChildGone when the pipe closes."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                return None
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise _ChildGone
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)  # JSON only: nothing from the child is ever unpickled
        except ValueError:
            message = None
        if not isinstance(message, dict) or "status" not in message:
            self._kill()
            raise RewardError(f"isolated reward '{self.source}': the child sent something that is not our "
                              "JSON protocol; child killed")
        return message

    # -- lifecycle -------------------------------------------------------

    def _start(self) -> None:
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "reward.isolation", str(child_read), str(child_write)],
                pass_fds=(child_read, child_write), env=scrubbed_environment(),
                start_new_session=True,  # its own process group: killed as one, grandchildren included
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(child_read)
            os.close(child_write)
        self._to_child, self._from_child, self._buffer = parent_write, parent_read, b""
        self._send({"source": self.source, "kwargs": self.kwargs, "memory_mb": self.memory_mb,
                    "sys_path": [p for p in sys.path if p]})
        try:
            message = self._receive(self.start_timeout)
        except _ChildGone:
            code = self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': the child died while starting (exit code {code})"
            ) from None
        if message is None:
            self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': the child did not start in {self.start_timeout:g} s"
            )
        if message["status"] != "ready":
            self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': loading the source in the child failed: {message.get('detail')}"
            )

    def _kill(self) -> int | None:
        """Kill the child's whole process group; return the child's exit code."""
        proc, self._proc = self._proc, None
        for fd in (self._to_child, self._from_child):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._to_child = self._from_child = None
        if proc is None:
            return None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group is the child's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already (or the child only just exited)
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[Any]:
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
        n = len(prompts)
        try:
            self._send({"prompts": list(prompts), "completions": list(completions),
                        "columns": data_columns(columns, n)})
        except (BrokenPipeError, OSError):
            code = self._kill()
            raise RewardError(f"isolated reward '{self.source}': the child is gone (exit code {code})") from None
        except (TypeError, ValueError) as exc:
            raise RewardError(
                f"isolated reward '{self.source}': the batch cannot be sent to the child as JSON: {exc}"
            ) from exc
        try:
            message = self._receive(self.timeout)
        except _ChildGone:
            code = self._kill()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise RewardError(
                f"isolated reward '{self.source}': the child crashed on a batch of {n} samples ({how})"
            ) from None
        if message is None:
            self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': timed out after {self.timeout:g} s on a batch of {n} samples; "
                "child killed"
            )
        status, detail = message["status"], message.get("detail")
        if status == "ok":
            try:
                return checked_scores(detail, n)
            except ValueError as exc:
                raise RewardError(f"isolated reward '{self.source}': {exc}") from None
        if status == "memory":
            self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': exceeded its memory limit of {self.memory_mb} MB "
                f"on a batch of {n} samples; child killed"
            )
        raise RewardError(f"isolated reward '{self.source}' raised {detail}")

    def close(self) -> None:
        """Stop the child (and anything it started)."""
        self._kill()

    def __enter__(self) -> IsolatedReward:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
