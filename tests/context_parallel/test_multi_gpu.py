"""NCCL on two GPUs: the benchmark's correctness phase (fast ring step kernels vs the fp32 math kernel,
ring attention and both sparse CP kernels vs the dense oracle, gradients included) at a small size.

Skipped without two CUDA GPUs (tests/conftest.py). Runs `tools/bench_context_parallel.py` under torchrun,
exactly as the benchmark is run, and asserts on the JSON it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.multi_gpu
@pytest.mark.timeout(600)
def test_bench_checks_pass_on_two_gpus(tmp_path):
    out = tmp_path / "cp.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        str(ROOT / "tools" / "bench_context_parallel.py"),
        "--seq-len", "16384", "--iters", "1", "--sparse-iters", "1", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["gpus"] == 2
    assert all(c["ok"] for c in result["step_kernel_checks"].values()), result["step_kernel_checks"]
    assert result["cp_checks"] and all(c["ok"] for c in result["cp_checks"].values()), result["cp_checks"]
    assert {"sink_window_flex", "block_strided_flex", "sink_window_torch", "block_strided_torch"} <= set(
        result["cp_checks"]
    )
    for entry in result["sparse"].values():
        assert entry["bytes_fraction_of_allgather"] < 1.0
        assert set(entry["timings"]) == {"flex", "torch"}
