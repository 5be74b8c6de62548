"""Run guards: preemption signals, the checkpoint helper processes, and non-finite losses.

- `PreemptionFlag`: SIGTERM / SIGUSR1 (Slurm's preemption and `--signal` warnings) and SIGINT (Ctrl-C) only
  set a flag; the training loop asks `should_stop()` once per step, which all-reduces the flag (MAX) over
  the default group so that every rank saves at the same step and exits cleanly. A second SIGINT aborts at
  once (exit status 130, no save).
- `shield_helper_processes()`: Megatron-Core's checkpoint save starts helper processes (below); Slurm
  signals every process of a job step, so without the shield a preemption signal kills the helpers in the
  middle of the save that the signal asked for. Helpers started inside the shield ignore the preemption
  signals and die with the process that started them (also when it is SIGKILLed).
- `NanGuard`: what to do with a non-finite loss: `stop` raises FloatingPointError naming the step;
  `skip` drops the update and counts it, raising once more than `max_skips` steps were skipped.

The helpers of Megatron-Core 0.16.1's synchronous `dist_checkpointing.save` (torch_dist strategy, on every
rank that has data to write):
- `FileSystemWriterAsync.write_preloaded_data_multiproc` forks one short-lived writer per bucket
  (`thread_count=2`) for each save (0.19 writes from threads of the saving process instead);
- `filesystem_async._get_write_results_queue` spawns, at the rank's first save, a `SyncManager` server
  (`python -c "from multiprocessing.spawn import spawn_main ..."`) that lives until the trainer exits and
  carries the writers' results (0.19: `get_write_results_queue`); the spawn also starts Python's
  `resource_tracker` process.
A dead manager fails the next save with `BrokenPipeError`. Its resource tracker is launched by
`resource_tracker.ensure_running`, which *unblocks* SIGINT and SIGTERM in the calling thread afterwards,
so an inherited signal mask alone does not protect the manager: the shield also blocks the signals in
each child explicitly (an at-fork hook for forked children, an initializer for the manager).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_MARKER_ENV = "LONGGEN_STOP_MARKER"
"""When set, `PreemptionFlag.should_stop` creates this file (global rank 0) the first time it returns True:
launchers (slurm/train.sbatch) tell a run stopped by a signal (requeue it) from a finished one (both exit 0)."""

_PR_SET_PDEATHSIG = 1


class PreemptionFlag:
    """Installs handlers for `signals` (restored by `restore()`); `received` is this rank's flag."""

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS):
        self.received: int | None = None
        self.interrupts = 0
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                # os.write, not print: the handler may interrupt a print on the same stream.
                os.write(2, b"[longgen] second interrupt: aborting without saving\n")
                os._exit(128 + signal.SIGINT)
            os.write(
                2,
                b"[longgen] interrupt: saving a checkpoint at the end of this step "
                b"(interrupt again to abort without saving)\n",
            )
        if self.received is None:
            self.received = signum

    def should_stop(self, *, device: torch.device) -> bool:
        """Collective over the default group: True when any rank got a signal."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        marker = os.environ.get(STOP_MARKER_ENV)
        if stop and marker and (not dist.is_initialized() or dist.get_rank() == 0):
            os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
            with open(marker, "w", encoding="utf-8") as fh:
                fh.write(f"stopped by a signal at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        return stop

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ------------------------------------------------------------------ checkpoint helper processes
_shield_depth = 0
_shield_signals: tuple[int, ...] = ()
_fork_parent_pid = 0
_fork_hook_installed = False


def die_with_parent(parent_pid: int, signals: tuple[int, ...] = PREEMPTION_SIGNALS) -> None:
    """In a child process: block `signals` and ask the kernel for SIGKILL when the parent exits (Linux
    `PR_SET_PDEATHSIG`, which fires when the parent *thread* exits: start children from the main thread).
    Exits at once when the parent is already gone. Also the initializer of the checkpoint results manager."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _before_fork() -> None:
    global _fork_parent_pid
    _fork_parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    if _shield_depth:  # stays set in the child: what it forks (e.g. an async save's writers) is shielded too
        die_with_parent(_fork_parent_pid, _shield_signals)


def _results_queue_with_initializer(mp_mode: str = "spawn"):
    """Megatron-Core's results-queue getter (`_get_write_results_queue` in 0.16, `get_write_results_queue`
    in 0.19), with `die_with_parent` run in the manager process."""
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing as mp

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context(mp_mode))
        signals = _shield_signals if _shield_depth else PREEMPTION_SIGNALS
        manager.start(initializer=die_with_parent, initargs=(os.getpid(), signals))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    return filesystem_async._results_queue


def _install_hooks() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook_installed = True
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    # Megatron-Core's lazily started results manager (see the module docstring): `_get_write_results_queue`
    # in 0.16, `get_write_results_queue(mp_mode)` in 0.19 (looked up in the module at each writer's start).
    if hasattr(filesystem_async, "_results_queue"):
        for name in ("_get_write_results_queue", "get_write_results_queue"):
            if hasattr(filesystem_async, name):
                setattr(filesystem_async, name, _results_queue_with_initializer)


@contextlib.contextmanager
def shield_helper_processes(signals: tuple[int, ...] = PREEMPTION_SIGNALS):
    """Run a block that may start helper processes (Megatron-Core's checkpoint writers) so that those
    processes block `signals` and get SIGKILL when this process exits.

    The calling thread blocks `signals` too while the block runs (so that children inherit the mask); a
    signal that arrives meanwhile stays pending, or is taken by another thread, and its Python handler runs
    as usual: `PreemptionFlag` still sees it. The previous mask is restored on exit. Main thread only.
    """
    global _shield_depth, _shield_signals
    _install_hooks()
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    previous_signals = _shield_signals
    _shield_depth += 1
    _shield_signals = tuple(signals)
    try:
        yield
    finally:
        _shield_depth -= 1
        _shield_signals = previous_signals
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


class NanGuard:
    """Decides per step whether a loss is usable. `skipped` counts the steps dropped so far."""

    def __init__(self, *, policy: str, max_skips: int, skipped: int = 0):
        if policy not in ("stop", "skip"):
            raise ValueError(f"nan policy must be stop or skip, got {policy!r}")
        self.policy = policy
        self.max_skips = max_skips
        self.skipped = skipped

    def check(self, value: float, *, step: int, what: str = "loss") -> bool:
        """True when `value` is finite. For a non-finite value: raise (`stop`, or `skip` over budget),
        else count it and return False (the caller drops the update). `step` is 1-based."""
        if math.isfinite(value):
            return True
        if self.policy == "stop":
            raise FloatingPointError(
                f"{what} is {value} at step {step}; stopping (set train.nan_policy=skip to skip such steps)"
            )
        self.skipped += 1
        if self.skipped > self.max_skips:
            raise FloatingPointError(
                f"{what} is {value} at step {step}: {self.skipped} non-finite steps skipped, more than "
                f"train.max_nan_skips={self.max_skips}; stopping"
            )
        return False
