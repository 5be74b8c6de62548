"""Checkpoint saves that fail for reasons the user can fix: a full disk, a quota, a read-only or
unwritable folder. They become one `CheckpointSaveError` that says so, with the path, the space the
checkpoint needs and what to do; the last good checkpoint is never touched (the caller removes the
partial `.tmp_step_N` folder).

The space a checkpoint needs is estimated from the state it saves: the bytes of every tensor this rank
owns the main replica of (model shards, optimizer state), summed over ranks by the caller. Megatron-Core
reports a write failure as a `CheckpointException` holding each rank's exception (on the coordinator
only) or, from torch's zip writer, as `RuntimeError: ... unexpected pos 704 vs 598`; `classify_save_error`
looks through both and, when no errno survives, compares the free space with the estimate.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_DISK_FULL_TEXT = ("no space left", "unexpected pos", "disk quota exceeded", "failed writing file")


class CheckpointSaveError(OSError):
    """A checkpoint save that failed for an environmental reason; the message is the whole story."""

    def __init__(self, message: str, *, code: int | None = None, path: str | os.PathLike | None = None):
        super().__init__(code, message, None if path is None else str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable across processes with its message (OSError's default drops it)
        return (_rebuild, (self.message, self.errno, self.filename))


def _rebuild(message, code, path):
    return CheckpointSaveError(message, code=code, path=path)


def format_bytes(num: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num >= scale:
            return f"{num / scale:.2f} {unit}"
    return f"{num} B"


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def local_checkpoint_bytes(*sharded_state_dicts) -> int:
    """Bytes this rank will write for the given sharded state dicts: the tensors of every ShardedTensor,
    ShardedTensorFactory and ShardedObject whose main replica it holds (what dist_checkpointing saves
    from this rank). Sum it over ranks for the checkpoint's size."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase, is_main_replica

    def walk(node) -> int:
        if isinstance(node, ShardedBase):
            return _tensor_bytes(node.data) if is_main_replica(node.replica_id) else 0
        if isinstance(node, dict):
            return sum(walk(v) for v in node.values())
        if isinstance(node, (list, tuple)):
            return sum(walk(v) for v in node)
        return 0

    return sum(walk(sd) for sd in sharded_state_dicts if sd is not None)


# Serialization overhead on top of the raw tensor bytes: torch.save framing per tensor (~2% on the tiny
# test model, less on large ones), plus each rank's RNG file and the metadata/common files (~256 KiB).
_OVERHEAD_FRACTION = 0.03
_OVERHEAD_PER_RANK = 256 * 2**10


def checkpoint_size_estimate(tensor_bytes: int, *, world_size: int) -> int:
    """Disk bytes a checkpoint holding `tensor_bytes` of tensors (summed over ranks) needs, rounded up."""
    return int(tensor_bytes * (1 + _OVERHEAD_FRACTION)) + _OVERHEAD_PER_RANK * world_size


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for unprivileged users) on the file system holding `path` or its nearest parent."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _causes(err: BaseException):
    """The exception, its causes and contexts, and the per-rank exceptions of a CheckpointException."""
    seen, todo = set(), [err]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        todo += [exc.__cause__, exc.__context__]
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            todo += [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
        todo += [a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)]


def space_message(*, name: str, root: Path, need: int, free: int | None, previous: Path | None) -> str:
    have = "unknown" if free is None else format_bytes(free)
    return (
        f"cannot save checkpoint {name} in {root}: no space left on the device (the checkpoint needs about "
        f"{format_bytes(need)}, {have} free there). Free space, lower train.keep_last_checkpoints or use "
        f"another --run-dir; {_untouched(previous)}"
    )


def _untouched(previous: Path | None) -> str:
    if previous is None:
        return "no earlier checkpoint exists and the partial save was removed"
    return f"the last good checkpoint {previous} is untouched and the partial save was removed"


def classify_save_error(
    err: BaseException, *, name: str, root: Path, need: int, previous: Path | None
) -> CheckpointSaveError | None:
    """A CheckpointSaveError for a full disk or an unwritable folder, or None for anything else (a bug:
    the caller re-raises the original)."""
    codes = [
        (e.errno, getattr(e, "filename", None), e.strerror) for e in _causes(err) if isinstance(e, OSError)
    ]
    for code, filename, strerror in codes:
        if code in NOT_WRITABLE:
            where = filename or root
            return CheckpointSaveError(
                f"cannot save checkpoint {name}: {strerror or os.strerror(code)} writing {where}. Make {root} "
                f"writable or use another --run-dir; {_untouched(previous)}",
                code=code,
                path=where,
            )
    free = free_bytes(root)
    text = " ".join(str(e).lower() for e in _causes(err))
    if any(code in DISK_FULL for code, _, _ in codes) or (
        any(t in text for t in _DISK_FULL_TEXT) or (free is not None and free < need)
    ):
        return CheckpointSaveError(
            space_message(name=name, root=root, need=need, free=free, previous=previous),
            code=errno.ENOSPC,
            path=root,
        )
    return None
