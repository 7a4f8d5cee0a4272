"""Untrusted reward code in a child process: hang, crash and memory hog end in RewardError."""

import os
import sys
import time

import pytest

from alignment.errors import RewardError
from reward import RewardSource, build
from reward.isolation import IsolatedReward

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_AS is POSIX-only")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILE = "tests/reward/fixtures/untrusted_reward.py"
MEMORY_MB = 1024  # room for the interpreter; the hog asks for 4 GiB


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_runs_in_another_process_with_columns():
    with IsolatedReward(f"{FILE}:uses_column", timeout=10, memory_mb=MEMORY_MB) as iso:
        assert iso(["p", "p"], ["7 cats", "8"], answer=[7, 9], trainer_state=object()) == [1.0, 0.0]
    with IsolatedReward(f"{FILE}:pid", timeout=10, memory_mb=MEMORY_MB) as iso:
        assert iso(["p"], ["x"])[0] != float(os.getpid())


def test_isolated_function_is_called_by_keyword_as_in_process():
    with IsolatedReward(f"{FILE}:trl_style", timeout=10, memory_mb=MEMORY_MB) as iso:
        assert iso(["7 prompt", "9 prompt"], ["7 cats", "8"], answer=[7, 9]) == [1.0, 0.0]


def test_hang_is_killed_at_the_timeout():
    iso = IsolatedReward(f"{FILE}:hang", timeout=0.5, memory_mb=MEMORY_MB)
    pid = iso.pid
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"timed out after 0.5 s on a batch of 1 samples; child killed"):
        iso(["p"], ["x"])
    assert time.monotonic() - t0 < 3
    assert not alive(pid)
    iso.close()


def test_crash_is_a_reward_error():
    iso = IsolatedReward(f"{FILE}:crash", timeout=10, memory_mb=MEMORY_MB)
    pid = iso.pid
    with pytest.raises(RewardError, match=r"the child crashed on a batch of 2 samples \(exit code 3\)"):
        iso(["p", "p"], ["x", "y"])
    assert not alive(pid)
    with pytest.raises(
        RewardError, match="crashed"
    ):  # the next call starts a fresh child (which crashes again)
        iso(["p"], ["x"])


def test_memory_limit_is_enforced():
    iso = IsolatedReward(f"{FILE}:hog", timeout=20, memory_mb=MEMORY_MB)
    with pytest.raises(RewardError, match=f"exceeded its memory limit of {MEMORY_MB} MB"):
        iso(["p"], ["x"])


def test_exception_in_the_child_is_reported_and_the_child_survives():
    iso = IsolatedReward(f"{FILE}:boom", timeout=10, memory_mb=MEMORY_MB)
    pid = iso.pid
    with pytest.raises(RewardError, match="raised ValueError: bad sample"):
        iso(["p"], ["x"])
    assert iso.pid == pid
    iso.close()
    assert not alive(pid)


def test_loading_failure_is_reported_at_construction():
    with pytest.raises(RewardError, match="loading the source in the child failed.*'nope' not found"):
        IsolatedReward(f"{FILE}:nope", timeout=10, memory_mb=MEMORY_MB)


def test_isolated_source_through_build_and_skip_mode():
    combined = build(
        [
            {
                "source": f"{FILE}:fine",
                "isolate": True,
                "timeout": 10,
                "memory_mb": MEMORY_MB,
                "name": "fine",
            },
            {
                "source": f"{FILE}:hang",
                "isolate": True,
                "timeout": 0.3,
                "memory_mb": MEMORY_MB,
                "on_error": "skip",
                "name": "hang",
            },
        ]
    )
    try:
        result = combined(["p", "p"], ["ab", "abcd"])
        assert result.per_source == {"fine": [2.0, 4.0], "hang": [None, None]}
        assert result.total == [None, None] and result.dropped == [0, 1]  # a hung source drops, never a 0
        assert result.metrics["reward/hang/failures"] == 1.0
    finally:
        combined.close()


def test_wrapped_in_a_reward_source_validates_child_results():
    src = RewardSource(IsolatedReward(f"{FILE}:fine", timeout=10, memory_mb=MEMORY_MB), name="iso")
    assert src(["p"], [[{"role": "assistant", "content": "abc"}]]) == [3.0]
    src.close()


def test_pickled_isolated_reward_starts_its_own_child():
    import pickle

    iso = IsolatedReward(f"{FILE}:pid", timeout=10, memory_mb=MEMORY_MB)
    clone = pickle.loads(pickle.dumps(iso))
    assert clone.pid is None
    first, second = iso(["p"], ["x"])[0], clone(["p"], ["x"])[0]
    assert first != second and second == float(clone.pid)
    iso.close()
    clone.close()
