"""Training state on disk, written so that a crash or a full disk never leaves half of it.

Adapters: each is written into a new hidden folder beside its place, every file and the folder
fsynced, then renamed into place (an existing adapter is first renamed aside, then deleted). A
reader sees the whole old adapter or the whole new one, never a config of one run beside the
weights of another.
Checkpoints: written to a temporary file, fsynced, then renamed over checkpoint.pt, the one it
replaces kept as checkpoint.prev.pt (the last good one, should the newest ever be unreadable).
Resuming: `load_for_resume` checks that a checkpoint belongs to this run (prefix length, model,
tasks) and says in one line why not, instead of a traceback from deep inside torch.load.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any, Callable

import torch

from .cli_common import UsageError, first_line

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FORMAT = 2       # 1: the first layout (bank, optimizer, step, losses, global_batch, world_size)


class CheckpointError(UsageError):
    """A checkpoint that cannot resume this run (the message says why, in one line)."""


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: str) -> None:
    """tempfile makes private files (0600) and folders (0700): give them the usual umask modes."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def write_folder_atomically(target: str, write: Callable[[str], Any]) -> None:
    """Call write(folder) on a new empty folder, then put that folder at `target` whole.

    Leftovers of an interrupted earlier call (hidden `.NAME.*` folders) are removed first."""
    target = os.path.abspath(target)
    parent, name = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}.tmp-") or entry.startswith(f".{name}.old-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):
            for file in files:
                _usual_mode(os.path.join(root, file))
                _fsync_file(os.path.join(root, file))
            _usual_mode(root)
            fsync_dir(root)
        old = None
        if os.path.lexists(target):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(state: dict, folder: str) -> str:
    """Write `state` to folder/checkpoint.pt durably; the checkpoint it replaces becomes
    checkpoint.prev.pt. Returns the path written."""
    path = os.path.join(folder, CHECKPOINT)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        _usual_mode(tmp)
        if os.path.isfile(path):
            os.replace(path, os.path.join(folder, PREVIOUS))
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read(path: str, map_location) -> dict:
    """The checkpoint at path, or CheckpointError saying why it cannot be read."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:      # torch raises several types for a truncated or corrupt file
        size = os.path.getsize(path)
        raise CheckpointError(f"{path} cannot resume: the file is unreadable, truncated or corrupt "
                              f"({size} bytes; {first_line(e)[:120]})") from None
    if not isinstance(state, dict) or not {"bank", "optimizer", "step"} <= set(state):
        raise CheckpointError(f"{path} cannot resume: it is not a prefix-kernels training checkpoint")
    return state


def _mismatch(state: dict, identity: dict, bank_shapes: dict) -> str | None:
    """Why a readable checkpoint does not belong to this run, or None."""
    saved = state.get("identity")
    if saved is not None:
        if saved.get("prefix_len") != identity["prefix_len"]:
            return (f"it was trained with --prefix-len {saved.get('prefix_len')}, this run asks for "
                    f"{identity['prefix_len']}")
        if saved.get("projection_hidden") != identity["projection_hidden"]:
            return (f"it was trained with --projection-hidden {saved.get('projection_hidden')}, this run asks "
                    f"for {identity['projection_hidden']}")
        if saved.get("model") != identity["model"]:
            return f"it was trained on another model ({_describe(saved.get('model'))}; this run: " \
                   f"{_describe(identity['model'])})"
        if saved.get("tasks") != identity["tasks"]:
            return f"it was trained on tasks {saved.get('tasks')}, this run has {identity['tasks']}"
    got = {k: tuple(v.shape) for k, v in state["bank"].items()}
    if got != bank_shapes:
        return f"its prefix bank has shapes {got}, this run's has {bank_shapes}"
    return None


def _describe(model: dict | None) -> str:
    if not model:
        return "unknown"
    return (f"{model.get('name')}: {model.get('model_type')}, {model.get('num_layers')} layers, "
            f"{model.get('num_kv_heads')} KV heads of {model.get('head_dim')}")


def load_for_resume(folder: str, identity: dict, bank_shapes: dict, map_location: Any = None,
                    note: Callable[[str], None] = print) -> tuple[dict, str] | None:
    """(checkpoint, path) to resume from folder, or None when there is none.

    identity: {'prefix_len', 'projection_hidden', 'model': {...}, 'tasks': [...]} of this run,
    bank_shapes: the bank's state_dict shapes. An unreadable checkpoint.pt falls back to
    checkpoint.prev.pt (said through `note`); one of another run raises CheckpointError."""
    path = os.path.join(folder, CHECKPOINT)
    previous = os.path.join(folder, PREVIOUS)
    if not os.path.isfile(path):
        if not os.path.isfile(previous):
            return None
        path = previous          # a crash between the two renames of save_checkpoint
    try:
        state = _read(path, map_location)
    except CheckpointError as e:
        if path == previous or not os.path.isfile(previous):
            raise
        note(f"{e}; resuming from the last good one, {previous}")
        path, state = previous, _read(previous, map_location)
    why = _mismatch(state, identity, bank_shapes)
    if why:
        raise CheckpointError(f"{path} cannot resume this run: {why} (pass another --out, or --no-resume "
                              "to start over)")
    return state, path
