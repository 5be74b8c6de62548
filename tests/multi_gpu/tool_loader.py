"""Import a script from `tools/` (not a package) as a module, once per process, so that spawned workers and
the test process see the same functions."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    """`tools/<name>.py` as module `<name>` (cached in sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    tools = str(ROOT / "tools")
    if tools not in sys.path:  # the tools import each other by file name
        sys.path.insert(0, tools)
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_torchrun(
    script: str, args: list[str], *, nproc: int, timeout_s: float
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node N tools/<script> ARGS` with this checkout importable."""
    env = dict(
        os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(ROOT / "tools" / script),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
