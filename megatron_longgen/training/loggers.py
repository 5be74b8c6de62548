"""Metric loggers behind one tiny interface (`log(metrics, step)`, `close()`).

- `MetricsLogger`: the no-op base class (what non-logging ranks get).
- `ConsoleLogger`: one human-readable line per logged step (step, loss, tokens/s, ETA, ...).
- `JsonlLogger`: appends one JSON object per logged step to `RUN_DIR/metrics.jsonl` (flushed each line).
- `WandbLogger`: Weights & Biases; imports wandb in its constructor; offline unless WANDB_MODE says
  otherwise.
- `LoggerGroup`: fans calls out to several loggers.
`metrics_rank(...)` tells which rank owns the final loss; only that rank builds real loggers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
from pathlib import Path


class MetricsLogger:
    """Default logger: does nothing."""

    def log(self, metrics: dict, step: int) -> None:
        return None

    def close(self) -> None:
        return None


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ConsoleLogger(MetricsLogger):
    """Prints `step   12/200 | loss 5.1234 | lr 3.0e-04 | 1234 tok/s | 0.52 s/step | ETA 01:38`."""

    def __init__(self, *, max_steps: int, print_fn=print):
        self.max_steps = max_steps
        self.print_fn = print_fn

    def log(self, metrics: dict, step: int) -> None:
        parts = [f"step {step:>5}/{self.max_steps}"]
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "eval_loss" in metrics:
            parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        if "grad_norm" in metrics:
            parts.append(f"grad {metrics['grad_norm']:.3f}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
        if "step_time_s" in metrics:
            parts.append(f"{metrics['step_time_s']:.2f} s/step")
        if "eta_s" in metrics:
            parts.append(f"ETA {_fmt_duration(metrics['eta_s'])}")
        self.print_fn(" | ".join(parts), flush=True)


class JsonlLogger(MetricsLogger):
    """One JSON object per `log` call, with `step` first."""

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a fresh file; a resumed run appends after the steps it already logged.
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def log(self, metrics: dict, step: int) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class WandbLogger(MetricsLogger):
    """Weights & Biases run. Project and name come from the config or WANDB_PROJECT / WANDB_NAME;
    mode from WANDB_MODE, else the config (offline by default: no network needed).

    The run id is kept in `RUN_DIR/wandb_run_id`: a resumed training run (`resume_run=True`) continues the
    same W&B run, so its curves have no seam; a fresh run gets a new id.
    """

    ID_FILE = "wandb_run_id"

    def __init__(self, *, project: str, name: str, config: dict, run_dir: str | os.PathLike,
                 mode: str = "offline", resume_run: bool = False):
        from megatron_longgen.utils.optional import require

        require("wandb", feature="W&B logging")
        import wandb

        self._wandb = wandb
        id_path = Path(run_dir) / self.ID_FILE
        if resume_run and id_path.is_file() and id_path.read_text().strip():
            run_id = id_path.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B run ids: short, lowercase alphanumeric
            tmp = id_path.with_suffix(".tmp")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, id_path)
        self.run_id = run_id
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", project),
            name=os.environ.get("WANDB_NAME", name),
            mode=os.environ.get("WANDB_MODE", mode),
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
        )

    def log(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001 (a side channel: losing it must not stop training)
            self._lost(exc, f" at step {step}")

    def close(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            self._lost(exc, " at the end")

    def _lost(self, exc: Exception, where: str) -> None:
        """W&B's service process is gone: Slurm's SIGTERM reaches every process of a job step, and the
        service (wandb-core) exits on it whatever the signal mask. Keep training; say so once."""
        self.run = None
        print(f"[longgen] W&B logging stopped{where}: {type(exc).__name__}: {exc} (its service process ended, "
              "e.g. on a SIGTERM to the job step); metrics.jsonl has every step and a resumed run continues "
              "the W&B run", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            self._wandb.teardown()  # unregisters W&B's exit hook, which would fail the same way


class LoggerGroup(MetricsLogger):
    def __init__(self, loggers: list[MetricsLogger]):
        self.loggers = loggers

    def log(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def is_metrics_rank(*, pp_rank: int, pp_size: int, tp_rank: int, dp_rank: int, cp_rank: int) -> bool:
    """The rank that holds the final loss: last pipeline stage, first TP/DP/CP rank."""
    return pp_rank == pp_size - 1 and tp_rank == 0 and dp_rank == 0 and cp_rank == 0


def metrics_rank(*, pp_size: int, world_size: int) -> int:
    """Global rank of the metrics owner under Megatron's default rank order (tp fastest, then cp, dp,
    pp slowest): the first rank of the last pipeline stage."""
    return world_size - world_size // pp_size
