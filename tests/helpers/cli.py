"""Command lines of the project's CLIs as a user types them, for subprocess tests."""

from __future__ import annotations

import sys
from pathlib import Path


def train_cmd(run_dir: str | Path, *args: str, recipe: str = "debug_tiny") -> list[str]:
    """`python -m megatron_longgen.train --recipe RECIPE --run-dir RUN_DIR ARGS...` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "megatron_longgen.train",
        "--recipe",
        recipe,
        "--run-dir",
        str(run_dir),
        *args,
    ]
