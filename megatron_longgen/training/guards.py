"""Run guards: preemption signals and non-finite losses.

- `PreemptionFlag`: SIGTERM / SIGUSR1 (Slurm's preemption and `--signal` warnings) only set a flag; the
  training loop asks `should_stop()` once per step, which all-reduces the flag (MAX) over the default
  group so that every rank saves at the same step and exits cleanly.
- `NanGuard`: what to do with a non-finite loss: `stop` raises FloatingPointError naming the step;
  `skip` drops the update and counts it, raising once more than `max_skips` steps were skipped.
"""

from __future__ import annotations

import math
import signal

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs handlers for `signals` (restored by `restore()`); `received` is this rank's flag."""

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, *, device: torch.device) -> bool:
        """Collective over the default group: True when any rank got a signal."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


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
