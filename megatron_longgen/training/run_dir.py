"""Ownership of a run directory: a run never silently destroys or mixes with another run's files.

Rules (issue: nothing lost):
- A folder that already holds a run (a `checkpoints/` folder with a checkpoint or a `metrics.jsonl`) is
  refused unless the command says `--resume` (continue it) or `--overwrite` (start afresh: the old
  contents move aside to `RUN_DIR.old-YYYYmmdd-HHMMSS`, nothing is deleted).
- A run dir that this process created is removed again when the run fails before its first step, so a
  typo in a flag leaves nothing behind (`abandon()`).
- On resume from step k, `metrics.jsonl` keeps its rows up to step k and drops the rows after it (they
  belong to steps the run is about to redo), rewritten through a temporary file; new rows are appended.

`inspect()` only reads, so every rank can run it and reach the same verdict before any rank writes; the
writes (`prepare`, `abandon`, `truncate_metrics`) are done by one rank.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_SUBDIR = "checkpoints"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class RunDirState:
    path: Path
    exists: bool
    num_checkpoints: int
    last_metrics_step: int | None

    @property
    def holds_a_run(self) -> bool:
        return self.num_checkpoints > 0 or self.last_metrics_step is not None


def _last_logged_step(metrics: Path) -> int | None:
    if not metrics.is_file():
        return None
    last = None
    with open(metrics, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                last = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run: ignored here, dropped on resume
    return last if last is not None else 0


def _can_write_in(folder: Path) -> bool:
    """Create and remove a probe file: also right for root (which `os.access` always lets through) and for
    immutable or read-only-mounted folders."""
    try:
        fd, name = tempfile.mkstemp(prefix=".longgen-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def inspect(path: str | os.PathLike) -> RunDirState:
    """A look at `path` (writes nothing but a removed probe file); raises RunDirError when it cannot be a
    run directory at all, or when its checkpoints could not be saved."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run dir {path} exists and is not a folder: choose another --run-dir")
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise RunDirError(f"run dir {path}: {probe} is a file, not a folder; choose another --run-dir")
    if not _can_write_in(probe):
        raise RunDirError(f"run dir {path}: {probe} is not writable by this user; choose another --run-dir")
    if not path.exists():
        return RunDirState(path=path, exists=False, num_checkpoints=0, last_metrics_step=None)
    ckpts = path / CHECKPOINTS_SUBDIR
    if ckpts.is_dir() and not _can_write_in(ckpts):
        raise RunDirError(
            f"run dir {path}: {ckpts} is not writable, so no checkpoint could be saved; make it writable or "
            "choose another --run-dir"
        )
    num_checkpoints = (
        sum(1 for child in ckpts.iterdir() if child.name.startswith("step_")) if ckpts.is_dir() else 0
    )
    return RunDirState(
        path=path,
        exists=True,
        num_checkpoints=num_checkpoints,
        last_metrics_step=_last_logged_step(path / METRICS_FILE),
    )


def check_claim(state: RunDirState, *, resume: bool, overwrite: bool) -> None:
    """Raise RunDirError when a fresh (non-resume, non-overwrite) run would reuse another run's folder."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: choose one")
    if state.holds_a_run and not (resume or overwrite):
        held = []
        if state.num_checkpoints:
            held.append(f"{state.num_checkpoints} checkpoint(s)")
        if state.last_metrics_step is not None:
            held.append(f"metrics up to step {state.last_metrics_step}")
        raise RunDirError(
            f"run dir {state.path} already holds a run ({', '.join(held)}): pass --resume to continue it, "
            f"--overwrite to move it aside and start afresh, or choose another --run-dir"
        )


def aside_name(path: Path, *, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    candidate = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.old-{stamp}-{n}")
    return candidate


class RunDirectory:
    """One run's folder. Single-writer operations (call them on one rank)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.created = False
        self.moved_aside: Path | None = None

    def prepare(self, state: RunDirState, *, overwrite: bool) -> None:
        """Create the folder (moving an existing run aside first with `overwrite`)."""
        if overwrite and state.exists and any(self.path.iterdir()):
            self.moved_aside = aside_name(self.path)
            os.replace(self.path, self.moved_aside)
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created = True

    def abandon(self) -> None:
        """Remove the folder again if this process created it (called when a run fails before step 1)."""
        if self.created and self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
            self.created = False

    def truncate_metrics(self, *, keep_through_step: int) -> int:
        """Drop `metrics.jsonl` rows with step > `keep_through_step` (and torn lines); returns rows dropped."""
        metrics = self.path / METRICS_FILE
        if not metrics.is_file():
            return 0
        kept, dropped = [], 0
        with open(metrics, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    step = int(row["step"])
                except (ValueError, KeyError, TypeError):
                    dropped += 1 if line.strip() else 0
                    continue
                if step <= keep_through_step:
                    kept.append(json.dumps(row) + "\n")
                else:
                    dropped += 1
        if dropped:
            tmp = metrics.with_name(f".{METRICS_FILE}.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(kept)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, metrics)
        return dropped
