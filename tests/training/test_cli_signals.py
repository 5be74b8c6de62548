"""The `longgen-train` process under preemption and crashes (subprocesses, each with a timeout):
SIGTERM mid-run produces a checkpoint and exit status 0; SIGKILL during a checkpoint save leaves the
previous checkpoint published and resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_longgen.training.checkpointing import complete_checkpoints, latest_checkpoint

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


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "megatron_longgen.train",
        "--recipe",
        "debug_tiny",
        "--run-dir",
        str(run_dir),
        *extra,
        *TINY,
    ]
    # A new session, so the test can end the trainer together with the writer processes it forks.
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _wait_for(predicate, *, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"trainer exited ({proc.returncode}) before {what}:\n{proc.stdout.read().decode()}"
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.timeout(240)
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--max-steps", "1000", "--save-interval", "0")
    _wait_for(lambda: _logged_steps(run_dir) >= 2, proc=proc, timeout_s=180, what="two logged steps")
    os.kill(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out.decode()
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None, out.decode()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 1000
    assert state["step"] == _logged_steps(run_dir)  # saved at the end of the last completed step
    assert "preemption signal" in out.decode()


@pytest.mark.timeout(300)
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    proc = _start(run_dir, "--max-steps", "1000", "--save-interval", "1")

    def saving_after_a_complete_one() -> bool:
        return bool(complete_checkpoints(ckpts)) and any(ckpts.glob(".tmp_step_*/model"))

    _wait_for(saving_after_a_complete_one, proc=proc, timeout_s=240, what="a save in progress")
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and any checkpoint writer it forked
    proc.wait(timeout=30)
    published = complete_checkpoints(ckpts)
    latest = latest_checkpoint(ckpts)
    assert latest is not None and latest == published[-1]
    in_progress = sorted(p.name for p in ckpts.glob(".tmp_step_*"))
    assert in_progress, "the kill should have interrupted a save"
    assert int(in_progress[0].split("_")[-1]) > int(latest.name.split("_")[-1])
    step = int(latest.name.split("_")[-1])

    # The previous checkpoint resumes: one more step, and the interrupted folder is cleaned up.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_longgen.train",
            "--recipe",
            "debug_tiny",
            "--run-dir",
            str(run_dir),
            "--resume",
            "--allow-change",
            "schedule",
            "--max-steps",
            str(step + 1),
            *TINY,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {latest} at step {step}" in result.stdout
    assert latest_checkpoint(ckpts).name == f"step_{step + 1:07d}"
    assert not list(ckpts.glob(".tmp_step_*"))
