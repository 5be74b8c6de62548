"""Metric loggers behind one tiny interface (`log(metrics, step)`, `close()`).

- `MetricsLogger`: the no-op base class (what non-logging ranks get).
- `ConsoleLogger`: one human-readable line per logged step (step, loss, tokens/s, ETA, ...).
- `JsonlLogger`: appends one JSON object per logged step to `RUN_DIR/metrics.jsonl` (flushed each line).
- `WandbLogger`: Weights & Biases; imports wandb in its constructor; offline unless WANDB_MODE says
  otherwise. Runs of one comparison share a group (LongGen and its `_full` baseline by default), carry
  `attention`, the sparse variant, the pattern and the parallel layout in their config, and define x-axes
  (`tokens`, `wall_clock_hours`) so that "loss vs tokens" and "loss vs wall-clock" need no manual set-up.
- `LoggerGroup`: fans calls out to several loggers.
`metrics_rank(...)` tells which rank owns the final loss; only that rank builds real loggers
(`build_loggers`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import ClassVar


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
    """Weights & Biases run. Project, name and group come from the config or WANDB_PROJECT / WANDB_NAME /
    WANDB_RUN_GROUP; mode from WANDB_MODE, else the config (offline by default: no network needed).

    The run id is kept in `RUN_DIR/wandb_run_id`: a resumed training run (`resume_run=True`) continues the
    same W&B run, so its curves have no seam; a fresh run gets a new id. Every metric is logged under its
    own name against the step, and again under `by_tokens/` and `by_time/` with `tokens` and
    `wall_clock_hours` as their x-axes (`define_metric`), so the UI's default charts compare runs by tokens
    and by wall clock.
    """

    ID_FILE = "wandb_run_id"
    AXES: ClassVar[dict[str, str]] = {"by_tokens": "tokens", "by_time": "wall_clock_hours"}
    PLOTTED = ("loss", "eval_loss", "tokens_per_s_per_gpu", "mfu", "mfu_dense_equiv")

    def __init__(
        self,
        *,
        project: str,
        name: str,
        config: dict,
        run_dir: str | os.PathLike,
        mode: str = "offline",
        resume_run: bool = False,
        group: str | None = None,
    ):
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
        mode = os.environ.get("WANDB_MODE", mode)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", project),
                name=os.environ.get("WANDB_NAME", name),
                group=os.environ.get("WANDB_RUN_GROUP", group),
                mode=mode,
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow",
            )
        except Exception as exc:  # noqa: BLE001  (no server, bad key, timeout: the user's setup, not a bug)
            from megatron_longgen.utils.cli import UserError

            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(
                f"W&B could not start a {mode} run ({type(exc).__name__}: {first[:200]}). Check the network and "
                "WANDB_API_KEY, or log offline (WANDB_MODE=offline; `wandb sync` later) or drop --wandb"
            ) from exc
        for prefix, axis in self.AXES.items():
            self.run.define_metric(axis)
            self.run.define_metric(f"{prefix}/*", step_metric=axis)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        row = dict(metrics)
        for prefix, axis in self.AXES.items():
            if axis in metrics:
                row[axis] = metrics[axis]
                row.update({f"{prefix}/{k}": metrics[k] for k in self.PLOTTED if k in metrics})
        try:
            self.run.log(row, step=step)
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
        print(
            f"[longgen] W&B logging stopped{where}: {type(exc).__name__}: {exc} (its service process ended, "
            "e.g. on a SIGTERM to the job step); metrics.jsonl has every step and a resumed run continues "
            "the W&B run",
            file=sys.stderr,
            flush=True,
        )
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


def comparison_config(cfg) -> dict:
    """What W&B gets as the run's config: the whole LongGenConfig plus the fields a comparison filters on."""
    from megatron_longgen.config import config_to_dict

    p = cfg.parallel
    return {
        **config_to_dict(cfg),
        "attention": "full" if cfg.is_full_attention else "longgen",
        "sparse_variant": None if cfg.is_full_attention else cfg.sparse.variant,
        "layer_pattern": cfg.model.layer_pattern,
        "layout": f"tp{p.tensor_parallel}-pp{p.pipeline_parallel}-cp{p.context_parallel}",
    }


def default_group(cfg) -> str:
    """The W&B group of a run: `logging.wandb_group`, else the recipe name without its `_full` suffix, so a
    LongGen run and its full-attention baseline land in one group."""
    if cfg.logging.wandb_group:
        return cfg.logging.wandb_group
    name = cfg.name
    return name.removesuffix("_full")


def build_loggers(trainer, *, resumed_at: int) -> MetricsLogger:
    """The loggers of one run: real ones on the metrics rank only. metrics.jsonl is appended to (a resume
    has already dropped the rows after the resumed step); the console line unless `quiet`; W&B when on."""
    if not trainer.is_logging_rank:
        return MetricsLogger()
    cfg = trainer.cfg
    loggers: list[MetricsLogger] = [JsonlLogger(trainer.run_dir / "metrics.jsonl", append=True)]
    if not trainer.quiet:
        loggers.append(ConsoleLogger(max_steps=cfg.train.max_steps))
    if cfg.logging.wandb:
        loggers.append(
            WandbLogger(
                project=cfg.logging.wandb_project,
                name=cfg.logging.run_name or cfg.name,
                config={**comparison_config(cfg), "world_size": trainer.world_size, "dp": trainer.dp_size},
                run_dir=trainer.run_dir,
                mode=cfg.logging.wandb_mode,
                resume_run=resumed_at > 0,
                group=default_group(cfg),
            )
        )
    return LoggerGroup(loggers)
