"""The Slurm launchers under a real one-node Slurm 22.05 on localhost (tests/slurm/conftest.py).

The tiny recipe is submitted through `slurm/train.sbatch` exactly as a user would (from a fresh clone, the
CPU route: `sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0`), with periodic saves, W&B offline and
one line per step. One run goes uninterrupted (the reference); the others are interrupted after their first
periodic save, (a) by the time-limit warning (`scancel -b -s USR1`: what `--signal=B:USR1@N` does) and
(b) by `scontrol requeue` (SIGTERM to every process of the job, then Slurm requeues). Each must save, be
requeued, resume and end COMPLETED with the reference's losses, one metrics row per step and the whole log.
(c) SIGKILLs the trainers and resubmits: the resume comes from the periodic save, behind the last logged
step, and metrics.jsonl must still hold one row per step.

The script's own logic (late signals, the SIGNAL_LEAD_S timer, DRY_RUN under sbatch) is checked with a
stand-in for `python` (PYTHON=...), which needs seconds instead of a training run.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import _free_port, _wait

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = 40
SAVE_INTERVAL = 4
TINY = (
    f"--max-steps {MAX_STEPS} --save-interval {SAVE_INTERVAL} --override model.hidden_size=64 "
    "model.num_attention_heads=4 model.num_query_groups=2 model.ffn_hidden_size=128 train.seq_length=128 "
    "train.global_batch_size=4 train.log_interval=1 train.lr_warmup_steps=2"
)
CPU_ROUTE = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0")

STUB = r"""#!/usr/bin/env bash
# Stands in for `python` in slurm/train.sbatch: the launch check echoes its arguments; the trainer acts
# out $STUB_MODE.
if [[ $1 == tools/check_launch.py ]]; then echo "stub launch check: $*"; exit 0; fi
case "$STUB_MODE" in
  late_usr1)  # training finishes; the time-limit warning reaches the batch shell just before the end
    trap '' USR1
    if [[ $SLURM_PROCID == 0 ]]; then scancel -b -s USR1 "$SLURM_JOB_ID"; fi
    sleep 3
    echo "stub trainer $SLURM_PROCID: finished"
    exit 0 ;;
  wait_usr1)  # first start: train until the relayed USR1, "checkpoint" and exit 0; after a requeue: finish
    if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then echo "stub trainer $SLURM_PROCID: resumed, finished"; exit 0; fi
    got=0
    trap 'got=1' USR1
    for _ in $(seq 1200); do [[ $got == 1 ]] && break; sleep 0.1; done
    [[ $got == 1 ]] || exit 3
    if [[ $SLURM_PROCID == 0 ]]; then mkdir -p "${LONGGEN_STOP_MARKER%/*}"; echo stopped > "$LONGGEN_STOP_MARKER"; fi
    echo "stub trainer $SLURM_PROCID: stopped by USR1"
    exit 0 ;;
esac
echo "stub: unexpected call: $*" >&2
exit 9
"""


# ---------------------------------------------------------------- helpers
def _job_env(cluster, run_dir: Path, **extra) -> dict[str, str]:
    return cluster.env(
        RECIPE="debug_tiny",
        RUN_DIR=run_dir,
        EXTRA_ARGS=TINY,
        OMP_NUM_THREADS=1,
        WANDB_MODE="offline",
        WANDB_PROJECT="longgen-slurm-test",
        MASTER_PORT=_free_port(),
        PYTHONUNBUFFERED=1,
        **extra,
    )


def _submit(cluster, clone: Path, env: dict, *options: str, script: str = "slurm/train.sbatch") -> int:
    return cluster.sbatch(*options, script, cwd=clone, env=env)


def _log(info: dict) -> str:
    path = Path(info["StdOut"])
    return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _kill_trainers(job_id: int) -> list[int]:
    """SIGKILL this job's trainer processes (found by their SLURM_JOB_ID), as a node failure would; returns
    the trainers' PIDs. Forks of a trainer (the background checkpoint writer has the trainer's command line)
    are killed too but not counted: they die with their trainer anyway."""
    import os
    import signal

    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            if (proc.info["cmdline"] or [])[1:3] == ["-m", "megatron_longgen.train"] and proc.environ().get(
                "SLURM_JOB_ID"
            ) == str(job_id):
                found[proc.pid] = proc.info["ppid"]
        except (psutil.Error, ProcessLookupError):
            continue
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(pid for pid, ppid in found.items() if ppid not in found)


def _wait_for_first_save(cluster, job_id: int, run_dir: Path) -> None:
    def saved():
        info = cluster.job(job_id)
        if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(
                f"job {job_id} is {info.get('JobState')} before its first save:\n{_log(info)}"
            )
        return (run_dir / "checkpoints" / "latest").is_file()

    _wait(saved, timeout_s=300, what=f"job {job_id}'s first periodic checkpoint", interval_s=0.1)


def _assert_resumed_like_the_reference(
    info: dict, run_dir: Path, reference: list[float], *, stop: str
) -> None:
    log = _log(info)
    fields = {k: info.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime", "EndTime")}
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (fields, log[-6000:])
    assert info["Restarts"] == "1", log[-6000:]
    job_id = info["JobId"]
    # The log is whole: both starts, appended (a truncating requeue would have lost the first).
    assert re.search(rf"job {job_id} start 1: debug_tiny", log) and re.search(
        rf"job {job_id} start 2:", log
    ), log
    assert re.search(rf"step +1/{MAX_STEPS} ", log), "the first start's steps are missing from the log"
    assert f"SIG{stop}: asking the trainers to checkpoint and stop" in log, log
    assert re.search(r"preemption signal( SIG\w+)?: saved", log), log
    assert "Traceback" not in log and "BrokenPipeError" not in log, log
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed, log
    assert SAVE_INTERVAL <= int(resumed.group(1)) < MAX_STEPS, log
    assert log.rstrip().endswith("training finished"), log[-3000:]
    # One metrics row per step, and the losses of the uninterrupted run.
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), [r["step"] for r in rows]
    assert [r["loss"] for r in rows] == reference
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{MAX_STEPS:07d}"
    assert not list(ckpts.glob(".tmp_step_*")), "an interrupted save was left behind"
    assert not (run_dir / ".stopped_by_signal").exists()


# ---------------------------------------------------------------- real training runs
@pytest.fixture(scope="module")
def reference(slurm_cluster, repo_clone, tmp_path_factory) -> list[float]:
    """The uninterrupted run's losses, through the same sbatch route."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job = _submit(
        slurm_cluster, repo_clone, _job_env(slurm_cluster, run_dir), *CPU_ROUTE, "--job-name=lg-ref"
    )
    info = slurm_cluster.wait_until_final(job, timeout_s=600)
    log = _log(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-6000:]
    assert Path(info["StdOut"]) == repo_clone / "logs" / f"lg-ref-{job}.out"
    assert "W&B: mode offline, project longgen-slurm-test, group debug_tiny" in log
    assert (run_dir / "wandb_run_id").is_file(), "the job did not pass --wandb"
    assert "recipe debug_tiny" in log or "tools/check_launch.py exited" in log  # the plan (or why not)
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    return [r["loss"] for r in rows]


@pytest.mark.timeout(900)
def test_time_limit_warning_saves_requeues_and_resumes(slurm_cluster, repo_clone, reference, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(
        slurm_cluster, repo_clone, _job_env(slurm_cluster, run_dir), *CPU_ROUTE, "--job-name=lg-usr1"
    )
    _wait_for_first_save(slurm_cluster, job, run_dir)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))  # = --signal=B:USR1@N firing
    info = slurm_cluster.wait_until_final(job, timeout_s=600)
    try:
        _assert_resumed_like_the_reference(info, run_dir, reference, stop="USR1")
    except AssertionError as err:
        raise AssertionError(f"{err}\n--- daemons ---\n{slurm_cluster.daemon_log(job)}") from None
    assert f"checkpointed after SIGUSR1; requeueing job {job}" in _log(info)


@pytest.mark.timeout(900)
def test_scontrol_requeue_saves_and_resumes(slurm_cluster, repo_clone, reference, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(
        slurm_cluster, repo_clone, _job_env(slurm_cluster, run_dir), *CPU_ROUTE, "--job-name=lg-requeue"
    )
    _wait_for_first_save(slurm_cluster, job, run_dir)
    slurm_cluster.run("scontrol", "requeue", str(job))
    info = slurm_cluster.wait_until_final(job, timeout_s=600)
    _assert_resumed_like_the_reference(info, run_dir, reference, stop="TERM")


@pytest.mark.timeout(900)
def test_hard_kill_then_resubmit_resumes_from_the_periodic_save_without_repeated_rows(
    slurm_cluster, repo_clone, reference, tmp_path
):
    # SIGKILL to the trainers (a node failure, an OOM kill): nothing is saved at the kill, so the next job
    # resumes from the last periodic checkpoint, behind the last logged step. The rows after it are logged
    # again and must replace the old ones (needs the trainer's metrics.jsonl replace-on-resume).
    run_dir = tmp_path / "run"
    env = _job_env(slurm_cluster, run_dir)
    job = _submit(slurm_cluster, repo_clone, env, *CPU_ROUTE, "--job-name=lg-kill")
    _wait_for_first_save(slurm_cluster, job, run_dir)
    saved_step = int((run_dir / "checkpoints" / "latest").read_text().split("_")[-1])
    _wait(
        lambda: (run_dir / "metrics.jsonl").read_text().count("\n") >= saved_step + 2,
        timeout_s=300,
        what="steps past the first save",
        interval_s=0.05,
    )
    # Not `scancel --signal=KILL`: Slurm turns that into its termination sequence (SIGTERM first, which saves).
    killed = _kill_trainers(job)
    assert len(killed) == 2, killed
    info = slurm_cluster.wait_until_final(job, timeout_s=300)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", _log(info)[
        -4000:
    ]  # a crash: not requeued
    logged = [r["step"] for r in _metrics(run_dir)]
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text().split("_")[-1])
    assert max(logged) > resumed_from, "the kill came too late to leave steps after the last save"

    job = _submit(
        slurm_cluster, repo_clone, _job_env(slurm_cluster, run_dir), *CPU_ROUTE, "--job-name=lg-kill"
    )
    info = slurm_cluster.wait_until_final(job, timeout_s=600)
    log = _log(info)
    fields = {k: info.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime", "EndTime")}
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (fields, log[-6000:])
    assert f"resumed from {run_dir / 'checkpoints'}" in log and f"at step {resumed_from}" in log, log
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), [r["step"] for r in rows]
    assert [r["loss"] for r in rows] == reference


# ---------------------------------------------------------------- the script's logic, with a stand-in trainer
@pytest.fixture
def stub_python(tmp_path) -> Path:
    path = tmp_path / "stub_python"
    path.write_text(STUB)
    path.chmod(0o755)
    return path


@pytest.mark.timeout(300)
def test_warning_after_training_finished_completes_without_requeue(
    slurm_cluster, repo_clone, stub_python, tmp_path
):
    env = _job_env(slurm_cluster, tmp_path / "run", PYTHON=stub_python, STUB_MODE="late_usr1")
    job = _submit(slurm_cluster, repo_clone, env, *CPU_ROUTE, "--job-name=lg-late")
    info = slurm_cluster.wait_until_final(job, timeout_s=240)
    log = _log(info)
    assert "SIGUSR1: asking the trainers to checkpoint and stop" in log, log  # the signal did land
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", log
    assert "training finished" in log and "requeueing" not in log, log


@pytest.mark.timeout(300)
def test_signal_lead_time_setting_warns_before_the_limit(slurm_cluster, repo_clone, stub_python, tmp_path):
    # A 1-minute limit and SIGNAL_LEAD_S=50: the script's timer must fire ~10 s after the start (Slurm's
    # own --signal is moved out of the way to 1 s before the limit).
    env = _job_env(
        slurm_cluster, tmp_path / "run", PYTHON=stub_python, STUB_MODE="wait_usr1", SIGNAL_LEAD_S=50
    )
    job = _submit(
        slurm_cluster, repo_clone, env, *CPU_ROUTE, "--time=1", "--signal=B:USR1@1", "--job-name=lg-lead"
    )
    info = slurm_cluster.wait_until_final(job, timeout_s=240)
    log = _log(info)
    fields = {k: info.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime", "EndTime")}
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (
        fields,
        log,
        slurm_cluster.daemon_log(job),
    )
    started = re.search(r"\[longgen\] (\S+) job \d+ start 1:", log)
    warned = re.search(r"\[longgen\] (\S+) SIGUSR1: asking the trainers", log)
    assert started and warned, log
    delay = _seconds(warned.group(1)) - _seconds(started.group(1))
    assert 5 <= delay <= 30, f"USR1 came {delay} s after the start; expected ~10 s\n{log}"
    assert f"requeueing job {job}" in log and "resumed, finished" in log, log
    assert "stub launch check" in log and log.count("stub launch check") == 1  # the plan: once per job


def _seconds(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


@pytest.mark.timeout(300)
def test_dry_run_under_sbatch_checks_the_recipe_layout_in_a_tiny_cpu_job(
    slurm_cluster, repo_clone, stub_python, tmp_path
):
    env = _job_env(slurm_cluster, tmp_path / "run", PYTHON=stub_python, DRY_RUN=1)
    for key in ("RECIPE", "EXTRA_ARGS"):
        env.pop(key)
    job = _submit(
        slurm_cluster,
        repo_clone,
        env,
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        script="slurm/llama2_70b_128k.sh",
    )
    info = slurm_cluster.wait_until_final(job, timeout_s=240)
    log = _log(info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    # The recipe's 8 x 8 layout is checked, not the 1 x 1 allocation of the dry-run job.
    assert (
        "stub launch check: tools/check_launch.py --recipe llama2_70b_128k --nodes 8 --gpus-per-node 8" in log
    ), log
    assert "DRY_RUN=1 in Slurm job" in log and "DRY_RUN=1 bash" in log, log
    assert "start 1" not in log  # no training launched


def test_logs_folder_ships_with_the_repository():
    # Slurm opens --output=logs/%x-%j.out before the script runs: without logs/ a job fails at launch
    # with no output anywhere (JobState=FAILED Reason=JobLaunchFailure ExitCode=0:53 on 22.05).
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "logs/.gitkeep"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if "not a git repository" in proc.stderr:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0, "logs/.gitkeep must be tracked: " + proc.stderr
    for script in ("slurm/train.sbatch", "slurm/llama2_7b_128k.sh", "slurm/llama2_70b_128k.sh"):
        text = (root / script).read_text()
        assert "#SBATCH --output=logs/%x-%j.out" in text and "#SBATCH --open-mode=append" in text, script
