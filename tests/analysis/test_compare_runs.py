"""tools/compare_runs.py: run dirs and W&B offline runs read back exactly; time-to-loss and speedups match
a hand computation; the report and the PNG plots are written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from megatron_longgen.analysis.compare import report, smooth, time_to_loss
from megatron_longgen.analysis.runs import read_run


def _write_run(path, *, pattern, losses, step_time, tokens_per_step=1000, mfu=0.3):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"name": path.name, "model": {"layer_pattern": pattern}}))
    rows = []
    for i, loss in enumerate(losses, start=1):
        rows.append(
            {
                "step": i,
                "loss": loss,
                "tokens": i * tokens_per_step,
                "wall_clock_s": 10.0 + i * step_time,
                "productive_s": i * step_time,
                "num_restarts": 0,
                "tokens_per_s_per_gpu": tokens_per_step / step_time,
                "mfu": mfu,
                "mfu_dense_equiv": 2 * mfu,
            }
        )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_report_numbers_match_a_hand_computation(tmp_path):
    losses_full = [5.0, 4.0, 3.0, 2.5, 2.2, 2.0]
    losses_lg = [5.0, 4.1, 3.1, 2.6, 2.3, 2.1]
    _write_run(tmp_path / "full", pattern="FFFF", losses=losses_full, step_time=2.0)
    _write_run(tmp_path / "lg", pattern="SFFS", losses=losses_lg, step_time=1.0)
    runs = [read_run(tmp_path / "lg"), read_run(tmp_path / "full")]
    markdown, numbers = report(runs)
    assert numbers["baseline"] == "full"

    # Hand computation: the target is the larger smoothed final loss; find each run's first crossing.
    def smoothed(xs):  # 6 points: too short to smooth
        return list(xs)

    target = max(smoothed(losses_full)[-1], smoothed(losses_lg)[-1])
    assert numbers["target_loss"] == pytest.approx(target)
    first = {
        name: next(i for i, v in enumerate(smoothed(ls), start=1) if v <= target)
        for name, ls in (("full", losses_full), ("lg", losses_lg))
    }
    t_full, t_lg = 10.0 + first["full"] * 2.0, 10.0 + first["lg"] * 1.0
    assert numbers["runs"]["lg"]["time_to_target_s"] == pytest.approx(t_lg)
    assert numbers["runs"]["lg"]["time_speedup"] == pytest.approx(t_full / t_lg)
    assert numbers["runs"]["lg"]["throughput_speedup"] == pytest.approx(2.0)
    assert "| lg | longgen | `SFFS` | 6 |" in markdown and "2.00x" in markdown
    assert smooth([1.0, 0.0]) == [1.0, 0.0]
    assert smooth([float(i) for i in range(50)])[4:6] == [3.5, 4.5]  # width 2
    assert time_to_loss(runs[0], -1.0) is None


def _wait_until_written(folder, *, quiet_s: float = 1.0, timeout_s: float = 60.0) -> None:
    """W&B's service process may still be writing the .wandb file when `finish()` returns on a loaded
    machine: wait until its size has not changed for `quiet_s`."""
    import time

    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        size = sum(f.stat().st_size for f in folder.glob("*.wandb"))
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.1)


def test_wandb_offline_run_reads_back_what_was_logged(tmp_path, monkeypatch):
    from megatron_longgen.training.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = [
        {
            "loss": 3.0 - 0.1 * i,
            "tokens": 512 * i,
            "wall_clock_s": 1.5 * i,
            "wall_clock_hours": 1.5 * i / 3600,
            "tokens_per_s_per_gpu": 100.0 + i,
        }
        for i in range(1, 40)
    ]
    logger = WandbLogger(
        project="p",
        name="lg-run",
        config={"attention": "longgen", "layer_pattern": "SFFS"},
        run_dir=tmp_path,
        group="g",
    )
    for step, row in enumerate(logged, start=1):
        logger.log(row, step)
    logger.close()
    folder = next((tmp_path / "wandb").glob("offline-run-*"))
    _wait_until_written(folder)
    run = read_run(folder)
    assert run.attention == "longgen" and run.layer_pattern == "SFFS"
    assert [r["step"] for r in run.rows] == list(range(1, 40))
    for got, want in zip(run.rows, logged):
        for key, value in want.items():
            assert got[key] == pytest.approx(value)
        assert got["by_time/loss"] == pytest.approx(want["loss"])


def test_cli_writes_report_and_plots(tmp_path):
    _write_run(tmp_path / "full", pattern="FFFF", losses=[4.0, 3.0, 2.0], step_time=2.0)
    _write_run(tmp_path / "lg", pattern="SFFS", losses=[4.0, 3.0, 2.0], step_time=1.0)
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/compare_runs.py",
            str(tmp_path / "lg"),
            str(tmp_path / "full"),
            "--out",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2.00x" in (out / "report.md").read_text()
    if importlib.util.find_spec("matplotlib") is None:  # the `plot` extra is missing: report only, said so
        assert "matplotlib is not installed" in proc.stderr and not list(out.glob("*.png"))
    else:
        for name in ("loss_vs_tokens", "loss_vs_wallclock", "throughput", "mfu"):
            assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, "tools/compare_runs.py", str(tmp_path), "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "neither a run dir" in bad.stderr
