"""examples/convert_train_compare/run.sh end to end, as its README says (shortened to 10 steps): convert a HF
Llama, train LongGen and the full baseline from it, compare. The example cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_convert_train_compare_example(tmp_path):
    work = tmp_path / "work"
    # As a user runs it: inside the environment the package is installed in (its `python`, `longgen-train`).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["bash", "examples/convert_train_compare/run.sh", str(work), "10"],
        check=False,
        capture_output=True,
        text=True,
        timeout=880,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("initialised weights from") == 2
    numbers = json.loads((work / "report" / "report.json").read_text())
    assert numbers["baseline"] == "debug_tiny_full"
    runs = numbers["runs"]
    assert runs["debug_tiny"]["attention"] == "longgen" and runs["debug_tiny"]["steps"] == 10
    assert runs["debug_tiny"]["throughput_speedup"] > 0
    # Both runs start from the same converted weights: equal first losses up to the attention pattern's effect
    # on a random model (sparse layers see fewer keys), and both fall.
    for name in ("longgen", "full"):
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["loss"] < rows[0]["loss"]
    assert "speedup vs baseline" in (work / "report" / "report.md").read_text()
