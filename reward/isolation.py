"""Run an untrusted reward source in a separate process with a time and memory limit.

The child is started with multiprocessing's "spawn" method (a fresh
interpreter: no state copied from the trainer), limits its own address space
with ``resource.setrlimit(RLIMIT_AS)`` before it imports the source, and then
serves calls over a pipe. A call that overruns the wall-clock timeout, or a
child that dies (a crash, a signal, the memory limit), is a `RewardError`; the
child is killed and a fresh one is started on the next call.
"""

from __future__ import annotations

import logging
import multiprocessing
import traceback
from typing import Any

from alignment.errors import RewardError
from reward.base import data_columns

logger = logging.getLogger(__name__)


def _child_main(conn: Any, source: str, kwargs: dict[str, Any], memory_mb: int | None) -> None:
    """Child process: limit memory, resolve the source, then answer calls until the pipe closes."""
    try:
        if memory_mb:
            import resource

            limit = int(memory_mb) * 1024 * 1024
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        from reward.base import _await
        from reward.registry import resolve

        fn = resolve(source, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        prompts, completions, columns = msg
        try:
            result = list(_await(fn(prompts, completions, **columns)))
            reply = ("ok", result)
        except MemoryError:
            reply = ("memory", None)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            tb = traceback.format_exc(limit=-3)
            reply = ("error", f"{type(exc).__name__}: {exc}\n{tb}")
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("memory", None))
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable score
            conn.send(("error", f"the result could not be sent back: {type(exc).__name__}: {exc}"))
        if reply[0] == "memory":
            return


class IsolatedReward:
    """A reward source run in a child process (spawn) with a timeout and a memory cap.

    Args:
        source_string: any source `reward.registry.resolve` accepts; resolved in the child.
        timeout: wall-clock seconds per call; on overrun the child is killed.
        memory_mb: address-space limit of the child (RLIMIT_AS), or None for no limit.
            It bounds virtual memory, so leave room for the interpreter and
            libraries (a few hundred MB; more with numpy/torch).
        kwargs: keyword arguments for `resolve`, e.g. ``{"pattern": "..."}``.
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
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._start()

    def __repr__(self) -> str:
        return f"IsolatedReward({self.source!r}, timeout={self.timeout}, memory_mb={self.memory_mb})"

    @property
    def pid(self) -> int | None:
        """The child's process id (None when no child is running)."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: an unpickled copy starts its own child on its first call."""
        keys = ("source", "timeout", "memory_mb", "kwargs", "start_timeout")
        return {k: getattr(self, k) for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = self._conn = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main,
            args=(child, self.source, self.kwargs, self.memory_mb),
            daemon=True,
            name="isolated-reward",
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        if not parent.poll(self.start_timeout):
            self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': the child did not start in {self.start_timeout:g} s"
            )
        try:
            status, detail = parent.recv()
        except (EOFError, OSError):
            code = self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': the child died while starting (exit code {code})"
            ) from None
        if status != "ready":
            self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': loading the source in the child failed: {detail}"
            )

    def _kill(self) -> int | None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        return proc.exitcode

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[Any]:
        if self._proc is None or not self._proc.is_alive():
            self._kill()
            self._start()
        n = len(prompts)
        try:
            self._conn.send((list(prompts), list(completions), data_columns(columns, n)))
        except (BrokenPipeError, EOFError, OSError):
            code = self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': the child is gone (exit code {code})"
            ) from None
        except Exception as exc:
            raise RewardError(
                f"isolated reward '{self.source}': the batch cannot be sent to the child: {exc}"
            ) from exc
        if not self._conn.poll(self.timeout):
            self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': timed out after {self.timeout:g} s on a batch of {n} samples; "
                "child killed"
            )
        try:
            status, detail = self._conn.recv()
        except (EOFError, OSError):
            code = self._kill()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise RewardError(
                f"isolated reward '{self.source}': the child crashed on a batch of {n} samples ({how})"
            ) from None
        if status == "ok":
            return detail
        if status == "memory":
            self._kill()
            raise RewardError(
                f"isolated reward '{self.source}': exceeded its memory limit of {self.memory_mb} MB "
                f"on a batch of {n} samples; child killed"
            )
        raise RewardError(f"isolated reward '{self.source}' raised {detail}")

    def close(self) -> None:
        """Stop the child."""
        if self._conn is not None:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
        if self._proc is not None:
            self._proc.join(2)
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
