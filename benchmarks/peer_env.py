"""The PPO peer's own virtual environment: trl 1.12.0, the last release with a PPOTrainer.

trl deleted its PPOTrainer in 1.13 (PR #7020), so the PPO peer cannot run in
the toolkit's environment.  On first use the harness creates
``benchmarks/.peer-venv-trl112`` with ``python3 -m venv`` and installs
``trl==1.12.0`` into it under ``constraints-cpu.txt`` (torch stays the CPU
build the toolkit uses), plus the transformers / accelerate releases that
trl 1.12.0 accepts.  Later runs reuse it; a marker file records what was
installed, and a venv whose marker is missing or different is rebuilt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = Path(__file__).resolve().parent / ".peer-venv-trl112"
CONSTRAINTS = ROOT / "constraints-cpu.txt"
MARKER = "benchmark-peer.json"

# trl 1.12.0 asks for transformers>=4.56.2, accelerate>=1.4.0, datasets>=4.7.0. transformers, accelerate and
# torch come from constraints-cpu.txt, the releases the toolkit itself runs, so the peer differs from ours by
# trl alone (a hard pin here went stale when the toolkit's pins moved, and pip refused the conflict).
PEER_REQUIREMENTS = ["trl==1.12.0", "transformers", "accelerate", "datasets", "psutil"]
PEER_OWN_PINS = {"trl"}  # constraints-cpu.txt pins the toolkit's trl; the peer's is the line above


class PeerEnvError(RuntimeError):
    """The peer environment could not be created; the message says which step failed and why."""


def peer_python(venv: Path = PEER_VENV) -> Path:
    return venv / "bin" / "python"


def base_python() -> str:
    """A Python interpreter outside any virtual environment (``python3 -m venv`` needs a real one)."""
    return getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable


def _marker(venv: Path) -> dict | None:
    path = venv / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_ready(venv: Path = PEER_VENV) -> bool:
    marker = _marker(venv)
    return bool(marker) and marker.get("requirements") == PEER_REQUIREMENTS and peer_python(venv).exists()


def _run(cmd: list[str], step: str, log) -> None:
    log(f"[peer-env] {step}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise PeerEnvError(f"{step} failed (exit {proc.returncode}):\n{tail}")


def peer_constraint_text(text: str) -> str:
    """constraints-cpu.txt without the lines of the packages the peer pins itself (PEER_OWN_PINS)."""
    kept = []
    for line in text.splitlines():
        name = re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()
        if name not in PEER_OWN_PINS:
            kept.append(line)
    return "\n".join(kept) + "\n"


def ensure(venv: Path = PEER_VENV, log=print) -> Path:
    """Create (once) and return the peer venv's python; raise :class:`PeerEnvError` with the reason."""
    if is_ready(venv):
        return peer_python(venv)
    if venv.exists():
        shutil.rmtree(venv)
    _run([base_python(), "-m", "venv", str(venv)], "create venv", log)
    pip = [str(peer_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if CONSTRAINTS.is_file():
        peer_constraints = venv / "constraints-peer.txt"
        peer_constraints.write_text(peer_constraint_text(CONSTRAINTS.read_text()))
        pip += ["-c", str(peer_constraints)]
    _run(pip + PEER_REQUIREMENTS, "pip install trl==1.12.0", log)
    probe = (
        "import json, torch, transformers, accelerate, trl;"
        "from trl.experimental.ppo import PPOConfig, PPOTrainer;"
        "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__,"
        " 'accelerate': accelerate.__version__, 'trl': trl.__version__}))"
    )
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(peer_python(venv)), "-c", probe], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise PeerEnvError("trl 1.12.0 installed but `from trl.experimental.ppo import PPOTrainer` fails:\n"
                           + "\n".join(proc.stderr.strip().splitlines()[-15:]))
    versions = json.loads(proc.stdout.strip().splitlines()[-1])
    (venv / MARKER).write_text(json.dumps({"requirements": PEER_REQUIREMENTS, "versions": versions}, indent=1))
    log(f"[peer-env] ready: {versions}")
    return peer_python(venv)


def versions(venv: Path = PEER_VENV) -> dict:
    marker = _marker(venv) or {}
    return marker.get("versions", {})


if __name__ == "__main__":
    print(ensure())
