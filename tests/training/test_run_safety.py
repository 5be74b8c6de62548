"""Nothing lost, nothing cryptic: `longgen-train` as a user runs it (subprocesses, each with a timeout).

Each case asserts the exit status, the message and what is (not) left on disk:
- an existing run dir is refused without --resume / --overwrite; --overwrite moves it aside;
- a run that fails before its first step leaves no run dir; a run dir that is a file is refused;
- --resume refuses another model and an unannounced schedule change; `--allow-change schedule` rebuilds
  the LR schedule at the resumed step;
- metrics.jsonl has each step once after resuming from an earlier checkpoint;
- the wall clock, productive time and restart count continue across a resume;
- user errors found after parsing (world size, missing init checkpoint, W&B online without a key, a
  badly typed override) are one line and exit status 2; a pipeline-parallel run exits 0 with one summary
  line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import train_cmd

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

TINY = [
    "--override",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "train.seq_length=128",
    "train.log_interval=1",
    "train.lr_warmup_steps=2",
]


def _train(
    run_dir: Path, *extra: str, env: dict | None = None, timeout: int = 240
) -> subprocess.CompletedProcess:
    cmd = train_cmd(run_dir, *extra, *TINY)
    return subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("longgen-train:")]


def _one_line_error(proc: subprocess.CompletedProcess, status: int, text: str) -> None:
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1 and text in lines[0], proc.stderr[-3000:]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step hybrid run (checkpoint at the end)."""
    run_dir = tmp_path_factory.mktemp("runs") / "done"
    proc = _train(run_dir, "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_existing_run_needs_resume_or_overwrite(finished, tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run_dir)], check=True)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = _train(run_dir, "--max-steps", "3")
    _one_line_error(proc, 2, "already holds a run (1 checkpoint(s), metrics up to step 3): pass --resume")
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert (run_dir / "checkpoints" / "step_0000003" / "trainer_state.json").is_file()

    proc = _train(run_dir, "--max-steps", "2", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = sorted(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == before
    assert (aside[0] / "checkpoints" / "step_0000003").is_dir()
    assert [r["step"] for r in _rows(run_dir)] == [1, 2]


def test_failure_before_the_first_step_leaves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, "--override", "data.corpus=/nonexistent/corpus.txt")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "/nonexistent/corpus.txt" in _error_lines(proc)[0]
    assert not run_dir.exists()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line_error(_train(a_file), 2, f"run dir {a_file} exists and is not a folder")


def test_resume_checks_what_it_resumes(finished, tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run_dir)], check=True)
    config_before = (run_dir / "config.json").read_text()

    proc = _train(run_dir, "--max-steps", "3", "--resume", "--attention", "full")
    _one_line_error(proc, 2, "belongs to a different run (model.layer_pattern: 'SSFFSS' -> 'FFFFFF')")
    assert (run_dir / "config.json").read_text() == config_before

    proc = _train(run_dir, "--max-steps", "6", "--resume")
    _one_line_error(proc, 2, "the schedule differs from")
    assert "train.max_steps: 3 -> 6" in proc.stderr and "--allow-change schedule" in proc.stderr

    proc = _train(run_dir, "--max-steps", "6", "--resume", "--allow-change", "schedule")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accepted schedule change: train.max_steps: 3 -> 6" in proc.stdout
    straight = tmp_path / "straight"
    assert _train(straight, "--max-steps", "6").returncode == 0
    resumed_lr = {r["step"]: r["lr"] for r in _rows(run_dir)}
    straight_lr = {r["step"]: r["lr"] for r in _rows(straight)}
    for step in (4, 5, 6):  # the 6-step schedule, not the 3-step one (which had reached its minimum)
        assert resumed_lr[step] == pytest.approx(straight_lr[step], rel=1e-12)
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_resume_from_an_earlier_checkpoint_logs_each_step_once_and_keeps_the_clock(tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(
        run_dir,
        "--max-steps",
        "5",
        "--save-interval",
        "2",
        "--override",
        "train.save_on_exit=false",
        "train.keep_last_checkpoints=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = _rows(run_dir)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    saved = json.loads((run_dir / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())["clock"]

    proc = _train(
        run_dir,
        "--max-steps",
        "5",
        "--resume",
        "--override",
        "train.save_on_exit=false",
        "train.keep_last_checkpoints=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped 1 row(s) after step 4" in proc.stdout
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[:4] == first[:4]
    redone = rows[4]
    assert redone["num_restarts"] == 1
    assert redone["restart_gap_s"] > 0
    # The wall clock continues from the checkpoint (plus the gap), not from zero.
    assert redone["wall_clock_s"] >= saved["wall_clock_s"] + redone["restart_gap_s"]
    assert redone["productive_s"] > saved["productive_s"]
    for key in ("eval_time_s", "checkpoint_time_s", "wall_clock_hours", "tokens"):
        assert key in redone


def test_user_errors_after_parsing_are_one_line(tmp_path):
    _one_line_error(
        _train(tmp_path / "a", "--override", "parallel.tensor_parallel=2"),
        2,
        "world size 1 must be a multiple of tp*pp*cp = 2*1*1 = 2",
    )
    _one_line_error(
        _train(tmp_path / "b", "--init-checkpoint", str(tmp_path / "missing")),
        2,
        f"init checkpoint {tmp_path / 'missing'} does not exist",
    )
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path)}
    _one_line_error(_train(tmp_path / "c", "--wandb", env=env), 2, "no API key is set: export WANDB_API_KEY")
    _one_line_error(
        _train(tmp_path / "d", "--override", "train.lr=abc"), 2, "override train.lr='abc': expected float"
    )
    for name in "abcd":
        assert not (tmp_path / name).exists()
    proc = _train(tmp_path / "e", "--override", "parallel.tensor_parallel=2", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.timeout(300)
def test_pipeline_parallel_run_exits_zero_with_one_summary_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "megatron_longgen.train",
        "--recipe",
        "debug_tiny",
        "--run-dir",
        str(tmp_path / "pp"),
        "--max-steps",
        "2",
        *TINY,
        "parallel.pipeline_parallel=2",
    ]
    proc = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[longgen] done")]
    assert len(summary) == 1, proc.stdout
    assert [r["step"] for r in _rows(tmp_path / "pp")] == [1, 2]
