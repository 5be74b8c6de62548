"""The `longgen-train` process under preemption, interrupts and crashes (subprocesses, each with a timeout):
SIGTERM or SIGINT mid-run produces a checkpoint and exit status 0; a second SIGINT aborts at once (130);
SIGKILL during a checkpoint save leaves the previous checkpoint published and resumable; no helper
process (Megatron-Core's checkpoint writers and results manager) outlives the trainer or the converter,
and the helpers survive the preemption signals that Slurm sends to every process of a job step."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_longgen.training.checkpointing import complete_checkpoints, latest_checkpoint
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


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = train_cmd(run_dir, *extra, *TINY)
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
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_exits_cleanly(tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--max-steps", "1000", "--save-interval", "0")
    with _Descendants(proc.pid) as tree:
        _wait_for(lambda: _logged_steps(run_dir) >= 2, proc=proc, timeout_s=180, what="two logged steps")
        os.kill(proc.pid, sig)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, out.decode()
        # The save on exit started Megatron-Core's helpers; they end with the trainer.
        assert tree.helpers(running=False), f"no checkpoint helper process was seen: {tree.cmdlines}"
        assert not _wait_until_gone(tree, timeout_s=30)
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None, out.decode()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert 2 <= state["step"] < 1000
    assert state["step"] == _logged_steps(run_dir)  # saved at the end of the last completed step
    assert "preemption signal" in out.decode()
    assert "Traceback" not in out.decode() and "KeyboardInterrupt" not in out.decode()
    if sig == signal.SIGINT:
        assert "[longgen] interrupt: saving a checkpoint at the end of this step" in out.decode()


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


# ---------------------------------------------------------------- interrupts and helper processes
def _is_helper(cmdline: str) -> bool:
    """Megatron-Core's results manager (spawned) or Python's resource tracker."""
    return "multiprocessing.spawn" in cmdline or "resource_tracker" in cmdline


class _Descendants:
    """Every process seen below `root` (a thread polls every 20 ms: forked writers come and go). Leaving
    the block kills, by PID, whatever is still alive: only processes this test started."""

    def __init__(self, root_pid: int):
        import psutil

        self.root = psutil.Process(root_pid)
        self.seen: dict[int, object] = {}
        self.cmdlines: dict[int, str] = {}  # the last one seen: a dead process has none
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        self._stop.set()
        self._thread.join()
        for proc in list(self.seen.values()):
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def _watch(self) -> None:
        import psutil

        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                for child in self.root.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
                    with contextlib.suppress(
                        psutil.Error
                    ):  # refreshed: a spawned child shows its exec'ed command late
                        self.cmdlines[child.pid] = " ".join(self.seen[child.pid].cmdline())
            time.sleep(0.02)

    def helpers(self, *, running: bool = True) -> list:
        return [
            p
            for pid, p in list(self.seen.items())
            if _is_helper(self.cmdlines.get(pid, "")) and (p.is_running() or not running)
        ]

    def alive(self) -> list[str]:
        import psutil

        out = []
        for proc in list(self.seen.values()):
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        return out


def _wait_until_gone(tree: _Descendants, *, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while tree.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    return tree.alive()


@pytest.mark.timeout(240)
def test_second_sigint_aborts_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--max-steps", "1000", "--save-interval", "0")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True)
    reader.start()
    with _Descendants(proc.pid) as tree:
        _wait_for(lambda: _logged_steps(run_dir) >= 2, proc=proc, timeout_s=180, what="two logged steps")
        os.kill(proc.pid, signal.SIGINT)
        # Signals do not queue: send the second only once the first was handled (else they merge into one).
        _wait_for(
            lambda: any(b"[longgen] interrupt:" in line for line in lines),
            proc=proc,
            timeout_s=60,
            what="the first interrupt's message",
        )
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
        text = b"".join(lines).decode()
        assert proc.returncode == 128 + signal.SIGINT, text
        assert text.rstrip().endswith("[longgen] second interrupt: aborting without saving"), text[-2000:]
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
        assert not _wait_until_gone(tree, timeout_s=60)  # os._exit: the helpers die by PR_SET_PDEATHSIG


@pytest.mark.timeout(300)
def test_helpers_survive_preemption_signals_and_die_with_a_killed_trainer(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "--max-steps", "1000", "--save-interval", "1")
    ckpts = run_dir / "checkpoints"
    try:
        with _Descendants(proc.pid) as tree:
            # Past the first save the results manager and the resource tracker are up.
            _wait_for(
                lambda: latest_checkpoint(ckpts) is not None and len(tree.helpers()) >= 2,
                proc=proc,
                timeout_s=240,
                what="the first save",
            )
            helpers = tree.helpers()
            # Slurm signals every process of a job step: the helpers must live through it, and saves go on.
            for helper in helpers:
                for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                    os.kill(helper.pid, s)
            time.sleep(0.5)
            assert all(h.is_running() for h in helpers), "a checkpoint helper died of a preemption signal"
            saved = latest_checkpoint(ckpts)
            _wait_for(
                lambda: latest_checkpoint(ckpts) != saved,
                proc=proc,
                timeout_s=120,
                what="a save after the helpers were signalled",
            )
            os.kill(proc.pid, signal.SIGKILL)  # the trainer only, not its process group
            proc.wait(timeout=60)
            left = _wait_until_gone(tree, timeout_s=30)
            assert not left, f"still running after the trainer was killed: {left}"
            writers = [pid for pid, cmd in tree.cmdlines.items() if not _is_helper(cmd)]
            assert len(writers) >= 2, "expected forked checkpoint writers too"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_no_helper_process_outlives_the_converter(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    # Many shards: one dist-checkpoint save per shard, so the conversion runs on after its helpers are up.
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_hf_to_mcore.py"
    cmd = [sys.executable, str(tool), "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
    )
    try:
        with _Descendants(proc.pid) as tree:

            def manager_serving() -> bool:  # its accepter thread runs once the manager serves
                return any(
                    "multiprocessing.spawn" in tree.cmdlines[p.pid] and p.num_threads() >= 2
                    for p in tree.helpers()
                )

            _wait_for(manager_serving, proc=proc, timeout_s=240, what="the converter's results manager")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            left = _wait_until_gone(tree, timeout_s=30)
            assert not left, f"still running after the converter was killed: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- the shield and the stop marker, in-process
def _child_report(conn) -> None:
    import ctypes

    value = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    conn.send((sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])), value.value))
    conn.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_shield_blocks_signals_in_forked_children_and_keeps_the_parents_handlers(monkeypatch, tmp_path):
    import multiprocessing

    from megatron_longgen.training.guards import STOP_MARKER_ENV, PreemptionFlag, shield_helper_processes

    ctx = multiprocessing.get_context("fork")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    flag = PreemptionFlag()
    try:
        with shield_helper_processes():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child_report, args=(child,))
            proc.start()
            blocked, deathsig = parent.recv()
            proc.join(timeout=30)
            # To this thread, which blocks it: pending, not lost (a process-wide signal may go to another thread).
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            assert flag.received is None
        assert flag.received == signal.SIGUSR1  # delivered as the block ends
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            assert int(sig) in blocked
        assert deathsig == signal.SIGKILL
        # A child forked outside the shield is an ordinary child.
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_report, args=(child,))
        proc.start()
        blocked, deathsig = parent.recv()
        proc.join(timeout=30)
        assert int(signal.SIGUSR1) not in blocked and deathsig == 0

        # The stop marker tells the Slurm script that the run stopped for a signal (not that it finished).
        import torch

        marker = tmp_path / "run" / ".stopped_by_signal"
        monkeypatch.setenv(STOP_MARKER_ENV, str(marker))
        assert flag.should_stop(device=torch.device("cpu"))
        assert marker.is_file()
    finally:
        flag.restore()
