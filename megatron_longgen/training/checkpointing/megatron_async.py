"""The Megatron-Core (0.16.1) async-save machinery `saver.py` builds on, in one place.

- `async_save_supported()`: where background saves are the default.
- `combine_requests(...)`: one `AsyncRequest` for the model and optimizer dist checkpoints, so one writer
  process runs both and the publish step runs after both (Megatron returns one request per `save`).
- `drain_write_results()`: the clean-up a failed combined request needs in Megatron's shared queue.
- `die_with_parent(...)`: a background writer does not outlive a killed trainer.
"""

from __future__ import annotations

import os

import torch


def async_save_supported() -> bool:
    """Whether `CheckpointSaver` defaults to background saves: on CUDA. Megatron-Core's AsyncCallsQueue forks
    the writer after a device->host copy and checks completion with an all-reduce.

    On CPU it works too (with Megatron-Core's CPU patches active: `patches/cpu.py`; the fork's copy-on-write
    memory is the snapshot; `train.async_save=true` asks for it), but it is not the default there: a CPU save
    is quick, and forking a trainer whose other threads (gloo, W&B) come and go hung once in ~6 CPU Slurm test
    runs under CPython 3.11.7 (the child blocked in `PyOS_AfterFork_Child` -> `_PyThreadState_DeleteExcept`).
    """
    return torch.cuda.is_available()


def combine_requests(requests: list, *, finalize) -> object:
    """One Megatron AsyncRequest for several `dist_checkpointing.save(..., async_sharded_save=True)`
    results: one preload (device->host copy, in the trainer), one writer process running each request's
    writer in turn, then every request's finalizers in order and `finalize` last."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    trainer_pid = os.getpid()

    def preload():
        return [r.preload_fn() if r.preload_fn is not None else None for r in requests]

    def write(_rank, staged, _unused):
        if os.getpid() != trainer_pid:  # a background writer (not execute_sync in the trainer)
            die_with_parent(trainer_pid)
        for request, buckets in zip(requests, staged):
            if request.async_fn is None:  # nothing to write on this rank
                continue
            args = list(request.async_fn_args)
            if buckets is not None:
                args[1] = buckets
            request.async_fn(*args, **request.async_fn_kwargs)

    finalize_fns = [fn for r in requests for fn in r.finalize_fns] + [finalize]
    # AsyncRequest.execute_sync and the async callers replace argument 1 with preload()'s result.
    return AsyncRequest(write, (None, None, None), finalize_fns, preload_fn=preload)


def die_with_parent(parent_pid: int) -> None:
    """In a background writer: ask Linux to kill this process when the trainer dies, so no writer
    outlives a killed trainer (its checkpoint could never be published anyway)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)


def drain_write_results() -> None:
    """Drop write results a failed save left in Megatron-Core's process-wide results queue.

    Each writer of a combined request reports into one shared queue (`filesystem_async._results_queue`,
    0.16.1), and each request's finalizer takes one report; when an earlier finalizer raises, the later
    reports stay queued and the next save would read them as its own (a stale "Worker failure"). The
    writers have all finished when a failure surfaces (finalizers run after them), so this drains only
    the failed save's reports.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results = getattr(filesystem_async, "_results_queue", None)
    while results is not None:
        try:
            results.get_nowait()
        except queue.Empty:
            return
        except (OSError, EOFError):  # the manager process is gone: nothing left to drain
            return
