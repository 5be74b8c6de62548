"""The main job end to end, as a user runs it: `python -m megatron_longgen.train --recipe debug_tiny`."""

import json
import subprocess
import sys

import pytest

from tests.helpers.cli import train_cmd

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier


@pytest.mark.parametrize(
    "extra", [["--sparse-variant", "block_strided"], ["--attention", "full"]], ids=["block_strided", "full"]
)
def test_tiny_run_writes_metrics_and_checkpoint(tmp_path, extra):
    run_dir = tmp_path / "run"
    cmd = train_cmd(
        run_dir, "--max-steps", "12", "--override", "train.seq_length=256", "train.log_interval=3", *extra
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ETA" in proc.stdout and "tok/s" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    for r in rows:
        assert {"step", "loss", "tokens_per_s", "lr", "grad_norm", "eta_s"} <= set(r)
        assert r["tokens_per_s"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    config = json.loads((run_dir / "config.json").read_text())
    pattern = config["model"]["layer_pattern"]
    assert pattern == ("FFFFFF" if "full" in extra else "SSFFSS")
    checkpoints = list((run_dir / "checkpoints").iterdir())
    assert len(checkpoints) >= 1 and any((c / "model").is_dir() for c in checkpoints)


def test_bad_override_exits_with_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "megatron_longgen.train",
        "--recipe",
        "debug_tiny",
        "--run-dir",
        str(tmp_path),
        "--override",
        "sparse.num_window_blocks=0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "num_window_blocks must be >= 1, got 0" in proc.stderr
