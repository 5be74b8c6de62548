"""Time accounting that survives preemption: the run's cumulative wall clock, its productive time, and a
per-window step time that leaves evaluation and checkpoint time out.

Definitions (what metrics.jsonl and W&B get, and what checkpoints carry in `trainer_state.json["clock"]`):

- `wall_clock_s`: seconds of real time since the run first started, *including* everything a restart
  costs: the work done after the last saved checkpoint (lost), the time the job waited to be requeued, and
  the restart's start-up. A resumed run continues from the value saved with the checkpoint plus the gap
  between that save and now, so `wall_clock_s` of a run preempted N times is what the user waited.
- `productive_s`: the sum of training-step time only (no start-up, evaluation, checkpointing or lost work).
- `restart_gap_s`: the part of `wall_clock_s` spent between a checkpoint's save and the resume that
  continued from it (summed over restarts); `num_restarts` counts them.
- `step_time_s` (per log window): the window's elapsed time minus the evaluation and checkpoint time spent
  inside it, divided by its steps. Throughput (tokens/s, TFLOP/s, MFU) derives from it; `eval_time_s` and
  `checkpoint_time_s` are logged separately.

Real time across processes uses `time.time()` (the only clock shared by two processes); intervals inside one
process use `time.perf_counter()`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass


@dataclass
class RunClock:
    """Cumulative time of a run across restarts. Build with `start()` or `resume(state)`."""

    wall_clock_base_s: float
    """`wall_clock_s` at `base_unix`."""
    base_unix: float
    """Wall-clock time (time.time()) at which `wall_clock_base_s` held."""
    productive_s: float = 0.0
    restart_gap_s: float = 0.0
    num_restarts: int = 0

    @classmethod
    def start(cls, *, now_unix: float | None = None) -> RunClock:
        """A fresh run starting now."""
        return cls(wall_clock_base_s=0.0, base_unix=time.time() if now_unix is None else now_unix)

    @classmethod
    def resume(cls, state: dict, *, started_unix: float) -> RunClock:
        """Continue a run from the `state_dict()` saved with a checkpoint. `started_unix` is when this
        process started; the time between the save and it counts as a restart gap."""
        gap = max(0.0, started_unix - float(state["saved_unix"]))
        return cls(
            wall_clock_base_s=float(state["wall_clock_s"]),
            base_unix=float(state["saved_unix"]),
            productive_s=float(state.get("productive_s", 0.0)),
            restart_gap_s=float(state.get("restart_gap_s", 0.0)) + gap,
            num_restarts=int(state.get("num_restarts", 0)) + 1,
        )

    def wall_clock_s(self, *, now_unix: float | None = None) -> float:
        now = time.time() if now_unix is None else now_unix
        return self.wall_clock_base_s + max(0.0, now - self.base_unix)

    def add_productive(self, seconds: float) -> None:
        self.productive_s += seconds

    def state_dict(self, *, now_unix: float | None = None) -> dict:
        """What a checkpoint saved now carries (JSON-serialisable)."""
        now = time.time() if now_unix is None else now_unix
        return {
            "wall_clock_s": self.wall_clock_s(now_unix=now),
            "saved_unix": now,
            "productive_s": self.productive_s,
            "restart_gap_s": self.restart_gap_s,
            "num_restarts": self.num_restarts,
        }

    def metrics(self) -> dict:
        wall = self.wall_clock_s()
        return {
            "wall_clock_s": wall,
            "wall_clock_hours": wall / 3600.0,
            "productive_s": self.productive_s,
            "restart_gap_s": self.restart_gap_s,
            "num_restarts": self.num_restarts,
        }

    def as_dict(self) -> dict:
        return asdict(self)


class StepTimer:
    """Training-step time per log window, with evaluation and checkpointing excluded.

    Call `step_done()` after each training step, wrap evaluation and saves in `excluded(kind)`, and read
    `window()` when logging. `sync` (e.g. `torch.cuda.synchronize`) runs before every clock read so that
    queued GPU work lands in the right interval.
    """

    def __init__(self, *, sync: Callable[[], None] | None = None):
        self._sync = sync or (lambda: None)
        self._mark = self._now()
        self._excluded_s = 0.0
        self._steps = 0
        self.excluded_totals: dict[str, float] = {}
        self._last_excluded: dict[str, float] = {}

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def step_done(self) -> None:
        self._steps += 1

    @contextlib.contextmanager
    def excluded(self, kind: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            spent = self._now() - start
            self._excluded_s += spent
            self.excluded_totals[kind] = self.excluded_totals.get(kind, 0.0) + spent
            self._last_excluded[kind] = self._last_excluded.get(kind, 0.0) + spent

    def window(self) -> tuple[float, int]:
        """(training seconds, steps) since the last call; the excluded time inside it is left out."""
        now = self._now()
        seconds = max(0.0, now - self._mark - self._excluded_s)
        steps = self._steps
        self._mark, self._excluded_s, self._steps = now, 0.0, 0
        return seconds, steps

    def pop_excluded(self) -> dict[str, float]:
        """Seconds per excluded kind (`eval`, `checkpoint`) since the last call, e.g. for `eval_time_s`."""
        out, self._last_excluded = self._last_excluded, {}
        return out
