"""The self-describing run directory.

    runs/tiny/sft/
      config.json, model.safetensors, tokenizer files   <- plain `transformers` loads these
      recipe.yaml        the resolved recipe (secrets redacted)
      run_info.json      versions, git commit, seed, data/tokenizer/template hashes, parent; "complete": true
      metrics.json       the stage's final numbers
      metrics.jsonl      one JSON object per logged step
      checkpoints/       trainer state for resuming (checkpoint-<step>/)

`run_info.json` is written last and atomically: a directory without it (or
with ``"complete": false``) is an unfinished run, whatever else it holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from alignment.errors import CheckpointError

RUN_INFO = "run_info.json"
CHECKPOINTS = "checkpoints"
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "evaluate", "tokenizers")


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old content or the new, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no stray temporary file; the old file is untouched
        raise


def describe_os_error(exc: OSError) -> str:
    """A one-line reason for a failed write, calling a full disk (or quota) by its name."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"disk full ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def write_failure_reason(exc: BaseException) -> str | None:
    """Why a write failed, when `exc` is a failed write; None for any other exception.

    A full disk does not always arrive as an OSError: safetensors raises its own
    ``SafetensorError`` ("I/O error: No space left on device (os error 28)") and
    ``torch.save`` a ``RuntimeError`` from its zip writer ("[enforce fail at
    inline_container.cc:...] . unexpected pos ...", no errno at all).
    """
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and ("I/O error" in text or "os error" in text):
        full = "No space left" in text or "os error 28" in text or "os error 122" in text
        return f"disk full (safetensors: {text})" if full else f"safetensors could not write: {text}"
    if isinstance(exc, RuntimeError) and ("inline_container.cc" in text or "PytorchStreamWriter" in text):
        return f"torch.save could not write the file, most often because the disk is full ({text})"
    return None


def fsync_paths(paths, directory: Path) -> None:
    """Flush files, then their directory, to the disk: a power cut after this keeps them (and their names)."""
    for path in paths:
        for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_hashes(tokenizer) -> dict:
    """Hashes that tell two tokenizers apart: vocabulary+merges and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab_text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"tokenizer": sha256_text(vocab_text), "chat_template": sha256_text(getattr(tokenizer, "chat_template", None))}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def is_complete(run_dir: str | Path) -> bool:
    info = Path(run_dir) / RUN_INFO
    if not info.is_file():
        return False
    try:
        return bool(read_json(info).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


# Files a stage writes into its run directory when it starts (prepare_run_dir); run_info.json when it finishes.
RUN_DIR_MARKERS = (RUN_INFO, "recipe.yaml", "data_fingerprints.json", CHECKPOINTS)


def require_finished_run(spec: str) -> None:
    """Loading or exporting one of our run directories needs its finished run_info.json.

    An interrupted run deletes run_info.json (it may hold its starting weights, or none), so a directory
    with the files a run writes at its start and no complete run_info.json is refused; naming one of
    its checkpoints (``<run>/checkpoints/checkpoint-N``) explicitly is the way to use it anyway.
    Anything else (a hub id, a plain model directory) passes.
    """
    path = Path(spec)
    if not path.is_dir() or is_complete(path) or not any((path / m).exists() for m in RUN_DIR_MARKERS):
        return
    checkpoint = latest_checkpoint(path)
    way_out = f"name a checkpoint explicitly ({checkpoint}) or " if checkpoint else ""
    raise CheckpointError(f"{spec} is an unfinished run (no complete {RUN_INFO}: it was interrupted, failed or is "
                          f"still running); {way_out}finish it with --resume first")


def mark_incomplete(run_dir: Path) -> None:
    """Before a stage writes into a directory, it stops looking finished."""
    info = Path(run_dir) / RUN_INFO
    if info.exists():
        info.unlink(missing_ok=True)


def parent_info(model_spec: str) -> dict | None:
    """Lineage: the parent checkpoint's path and the hash of its run_info.json (if it is one of ours)."""
    info = Path(model_spec) / RUN_INFO
    if not info.is_file():
        return {"model": model_spec}
    return {"model": model_spec, "run_info_sha256": hashlib.sha256(info.read_bytes()).hexdigest(),
            "stage": read_json(info).get("stage")}


def is_quantized(model) -> bool:
    """True for a bitsandbytes 4/8-bit model (or a peft model around one)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def merged_lora(model, recipe):
    """The model to save: a LoRA adapter merged into its weights (a plain transformers directory).

    A QLoRA adapter is merged into the base model loaded again in full precision (on the CPU):
    merged into 4/8-bit weights it would be quantized again, rounding most of the small update
    away, and the run would be a bitsandbytes checkpoint that loads only on a GPU with bitsandbytes.
    """
    if not hasattr(model, "merge_and_unload") or getattr(recipe.model, "lora", None) is None:
        return model
    if not is_quantized(model):
        return model.merge_and_unload()
    return merge_into_full_precision(model, recipe)


def merge_into_full_precision(model, recipe):
    """The trained adapter (and any modules_to_save, e.g. a score head) on an unquantized copy of the base, merged."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    import policies
    from policies.load import default_dtype

    spec = recipe.model
    config = model.peft_config[model.active_adapter]
    task = "sequence_classification" if config.task_type == "SEQ_CLS" else "causal_lm"
    dtype = spec.dtype if spec.dtype != "auto" else str(default_dtype()).removeprefix("torch.")
    base, _ = policies.load(spec.name_or_path, dtype=dtype, device="cpu", seed=recipe.seed, task=task,
                            trust_remote_code=spec.trust_remote_code, allow_pickle=spec.allow_pickle)
    fresh = get_peft_model(base, config)
    state = {name: tensor.detach().to("cpu", dtype=dtype_of(base)) for name, tensor in
             get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(fresh, state)
    return fresh.merge_and_unload()


def dtype_of(model):
    return next(model.parameters()).dtype


def save_run(run_dir: str | Path, *, model, tokenizer, recipe, run_info: dict, metrics: dict) -> Path:
    """Write the final run directory: weights (safetensors), tokenizer, recipe, metrics, then run_info.

    Weights are first written to a temporary folder beside the run and moved in
    file by file, so a crash mid-save never leaves a half-written weight file
    under its final name; run_info.json (the "complete" marker) comes last.
    """
    from alignment.distributed import is_main_process, wait_for_everyone

    run_dir = Path(run_dir)
    if not is_main_process():  # one writer; the others wait until the directory is whole
        wait_for_everyone()
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = run_dir / f".staging-{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        model_to_save = merged_lora(model, recipe)
        model_to_save.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        # Every byte is written now; the moves below are renames, which need no space.
        moved = []
        for item in staging.iterdir():
            target = run_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
            moved.append(target)
        staging.rmdir()
        write_atomic(run_dir / "recipe.yaml", recipe.resolved_yaml())
        write_json(run_dir / "metrics.json", metrics)
        # the weights must be on the disk before run_info.json says the run is complete
        fsync_paths(moved, run_dir)
        info = dict(run_info, complete=True, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        info.update(tokenizer_hashes(tokenizer))
        write_json(run_dir / RUN_INFO, info)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure_reason(exc)
        if reason is None:
            raise
        checkpoint = latest_checkpoint(run_dir)
        kept = f"; the trainer checkpoint {checkpoint} is kept" if checkpoint else ""
        raise CheckpointError(
            f"could not save the run to {run_dir}: {reason}. The weights already there are "
            f"untouched and the run is not marked complete{kept}; free some space and run again with "
            "resume=true"
        ) from exc
    unlock_run_dir(run_dir)  # finished: the next run of this directory needs --overwrite or --resume anyway
    wait_for_everyone()
    return run_dir


def base_run_info(recipe, data_files: list[str]) -> dict:
    from alignment.data import data_fingerprint

    return {
        "stage": recipe.stage,
        "seed": recipe.seed,
        "recipe_source": recipe.source_path,
        "recipe_sha256": sha256_text(recipe.resolved_yaml()),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "data": {path: data_fingerprint(path) for path in data_files if path},
        "parent": parent_info(recipe.model.name_or_path),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": False,
    }


def _readable_json(path: Path) -> bool:
    """The trainer writes trainer_state.json last: a checkpoint without a whole one is partial."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def _numbered_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("checkpoint-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete trainer checkpoint (`checkpoints/checkpoint-N` with its trainer state)."""
    candidates = [(n, p) for n, p in _numbered_checkpoints(run_dir) if _readable_json(p / "trainer_state.json")]
    return max(candidates)[1] if candidates else None


def partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders a kill left half-written (no whole trainer_state.json, which the trainer writes last)."""
    return [p for _, p in _numbered_checkpoints(run_dir) if not _readable_json(p / "trainer_state.json")]


def drop_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete the checkpoint folders a kill left half-written, so a resumed run neither loads nor keeps them.

    (The trainer would otherwise count them when it rotates old checkpoints
    and could delete the last complete one in their favour.)
    """
    removed = partial_checkpoints(run_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def set_aside_checkpoints(run_dir: str | Path) -> Path | None:
    """A fresh start moves an earlier run's checkpoints to `checkpoints.previous/` (then `.previous-2/`, ...).

    Left in place, a later resume of the new run could pick a checkpoint of the
    old one (a higher step number), silently mixing two runs.  Nothing is ever
    deleted here: forgetting `--resume` twice must not cost the first run's
    checkpoints, so each set-aside gets a name of its own.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not _numbered_checkpoints(run_dir):
        return None
    previous, n = Path(run_dir) / f"{CHECKPOINTS}.previous", 1
    while previous.exists():
        n += 1
        previous = Path(run_dir) / f"{CHECKPOINTS}.previous-{n}"
    os.replace(root, previous)
    return previous


def refuse_to_replace_a_finished_run(run_dir: str | Path, overwrite: bool) -> None:
    """A fresh start into a directory that holds a finished run needs `--overwrite` (recipe key `overwrite`)."""
    if not overwrite and is_complete(run_dir):
        raise CheckpointError(
            f"{run_dir} holds a finished run ({RUN_INFO} is complete); a fresh start would replace it. Pass "
            "--overwrite (overwrite=true) to train it again, --resume to continue it, or choose another output_dir")


# Staging folders of an interrupted final save (save_run) and of a PPO checkpoint write (PPOTrainer.save).
STAGING_PATTERNS = (".staging-*", f"{CHECKPOINTS}/checkpoint-*.tmp")


def remove_stale_staging(run_dir: str | Path) -> list[Path]:
    """Delete the staging folders a crash or a full disk left behind (they can hold gigabytes of weights).

    Called when a run starts, under the run lock, so no live writer owns them.
    """
    stale = [p for pattern in STAGING_PATTERNS for p in Path(run_dir).glob(pattern) if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


_LOCKS: dict[str, object] = {}  # run directory -> the open lock file this process holds


def lock_run_dir(run_dir: str | Path) -> None:
    """Hold `<run_dir>/.lock` (flock) for the rest of this process: a second run on the same directory fails.

    The kernel drops the lock when the process ends, however it ends, so a kill never leaves a stale lock.
    Taking it again in the same process (a resume in the same interpreter) is a no-op.
    """
    import fcntl

    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        return
    handle = open(Path(run_dir) / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CheckpointError(
            f"{run_dir} is in use by another run ({holder}); two runs writing one directory would corrupt "
            "each other's checkpoints. Wait for it to finish, stop it, or choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {platform.node()}\n")
    handle.flush()
    _LOCKS[key] = handle


def unlock_run_dir(run_dir: str | Path) -> None:
    handle = _LOCKS.pop(str(Path(run_dir).resolve()), None)
    if handle is not None:
        handle.close()  # closing the file releases the flock


def resume_checkpoint(run_dir: str | Path, resume: bool) -> str | None:
    """The checkpoint to resume from, or None for a fresh start; asking to resume with none is an error."""
    if not resume:
        return None
    found = latest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(
            f"resume was asked for but {Path(run_dir) / CHECKPOINTS} holds no complete checkpoint; "
            "run without resume=true to start fresh"
        )
    return str(found)
