"""Where a run's training checkpoints live and which of them are published (no torch, no Megatron here).

    RUN_DIR/checkpoints/
      latest                  text: the name of the newest published checkpoint ("step_0000100")
      step_0000100/           published: renamed from `.tmp_step_0000100` once complete (manifest last)
      .tmp_step_0000200/      a save in progress, or left by a killed one (readers ignore it)

A folder becomes `step_N` only through one atomic `os.replace` after every file, the manifest last, is
on disk; `latest` is rewritten afterwards through a temporary file + `os.replace`. `step_N` folders are
therefore the commit points; `latest` is the human-readable pointer (a crash between the rename and
its rewrite leaves it one checkpoint behind, which `manifest.find_resumable_checkpoint` handles).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
OPTIM_SUBDIR = "optim"
RNG_SUBDIR = "rng"
TMP_PREFIX = ".tmp_"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N of a `step_N` folder name, else None."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def temp_dir(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoints_dir) / f"{TMP_PREFIX}{checkpoint_name(step)}"


def rng_file(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint_dir) / RNG_SUBDIR / f"rank_{rank:05d}.pt"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file + fsync + `os.replace` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def published_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Every `step_N` folder (published, intact or not), oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(child), child) for child in root.iterdir() if child.is_dir()]
    return [path for step, path in sorted((s, p) for s, p in found if s is not None)]


def complete_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Published checkpoints holding trainer_state.json, oldest first (no integrity check: see
    `manifest.verify_checkpoint`)."""
    return [path for path in published_checkpoints(checkpoints_dir) if (path / TRAINER_STATE_FILE).is_file()]


def read_latest(checkpoints_dir: str | os.PathLike) -> str | None:
    """The folder name `latest` holds (stripped), or None without a readable `latest` file."""
    marker = Path(checkpoints_dir) / LATEST_FILE
    try:
        return marker.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, else None (no integrity check)."""
    root = Path(checkpoints_dir)
    named = read_latest(root)
    if (
        named is not None
        and checkpoint_step(named) is not None
        and (root / named / TRAINER_STATE_FILE).is_file()
    ):
        return root / named
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def read_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    """`DIR/trainer_state.json` of a published checkpoint; ValueError naming the file when unreadable."""
    path = Path(checkpoint_dir) / TRAINER_STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
