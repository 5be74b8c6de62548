"""A real one-node Slurm on localhost for the launcher tests.

`slurm_cluster` starts munged, slurmctld and slurmd (Debian's `slurm-wlm` 22.05 + `munge`; `.ci/run`
installs them with apt) with their config, key, sockets, state and logs in a temp dir and ports chosen
free, so it touches nothing in /etc and can run next to another cluster. The node is named `localhost`
(what `scontrol show hostnames` returns becomes the jobs' MASTER_ADDR, so it must resolve) and has 2 CPUs
and no GPUs. Skipped, with the reason, without the packages or without root (slurmd launches jobs as their
user). At the end every job is cancelled, each daemon is stopped by its PID, any process our slurmd
started that is still alive is killed by its PID, and the temp dir is removed, also when a test failed.

`repo_clone` is the repository as a fresh clone has it (the files git tracks, with their current content):
the jobs run there, so a file the launchers need but git does not ship (e.g. `logs/`) fails the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE = "localhost"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}

SLURM_CONF = """\
ClusterName=longgentest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=120
MinJobAge=600
MessageTimeout=60
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, *, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class SlurmCluster:
    base: Path
    conf: Path

    def env(self, **extra) -> dict[str, str]:
        """The environment for clients and jobs: this cluster's config, the test's Python first on PATH,
        nothing from an outer Slurm job or torch.distributed launch."""
        drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_SERVICE"):
            env.pop(key, None)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str]) -> int:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...). Retried: a loaded
        slurmctld may drop a client connection (scontrol then dies of SIGPIPE)."""
        for attempt in range(5):
            proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
            if proc.returncode == 0:
                return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
            time.sleep(1 + attempt)
        raise RuntimeError(f"scontrol show job {job_id} exited {proc.returncode}: {proc.stderr.strip()}")

    def wait_until_final(
        self, job_id: int, *, timeout_s: float, settle_s: float = 3.0, release_after_s: float = 2.0
    ) -> dict[str, str]:
        """Poll until the job ends. Slurm 22.05 holds a requeued job for ~2 minutes (PENDING,
        Reason=BeginTime); like an admin would, this releases it early (`scontrol update StartTime=now`),
        but only `release_after_s` after it became pending. Slurm's hold is what keeps the new start's job
        credential younger than the kill of the previous run: slurmd compares them in whole seconds, and a
        start in the same second as that kill is refused ("Job N already killed, do not launch batch job";
        slurmctld: "Killing non-startable batch JobId=N: Job credential revoked"; the job ends FAILED, exit
        1, with nothing in its log). A job that requeues itself from its batch script is pending well
        within that second, so releasing it at once failed about 1 run in 3.
        Such a job can also show a final state (e.g. FAILED, from the batch script killed for the requeue)
        for a moment before it is PENDING again: a final state counts once it has held for `settle_s`."""
        seen: dict[str, object] = {}
        pending: dict[str, float] = {}

        def final():
            info = self.job(job_id)
            state = info.get("JobState")
            if state == "PENDING" and info.get("Reason") == "BeginTime" and info.get("Restarts") != "0":
                since = pending.setdefault(info.get("Restarts", ""), time.monotonic())
                if time.monotonic() - since >= release_after_s:
                    self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            if state not in FINAL_STATES:
                seen.clear()
                return None
            key = (state, info.get("Restarts"))
            if seen.get("key") != key:
                seen.update(key=key, since=time.monotonic())
                return None
            return info if time.monotonic() - seen["since"] >= settle_s else None

        return _wait(final, timeout_s=timeout_s, what=f"job {job_id} to end", interval_s=0.5)

    def daemon_log(self, job_id: int, *, limit: int = 40) -> str:
        """The slurmctld / slurmd log lines about `job_id` (for failure messages)."""
        pattern = re.compile(
            rf"(JobId={job_id}|StepId={job_id}\.|job[ _]id {job_id}|job {job_id})\b", re.IGNORECASE
        )
        lines = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.base / name
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()
                lines += [f"{name}: {ln}" for ln in text if pattern.search(ln)]
        return "\n".join(lines[-limit:])

    def job_ids(self) -> list[int]:
        out = self.run("squeue", "-h", "-o", "%i", check=False).stdout
        return [int(x) for x in out.split()]


def _missing_reason() -> str | None:
    missing = [
        name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()
    ]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge (.ci/run does)"
    if os.geteuid() != 0:
        return "the localhost Slurm cluster needs root (slurmd starts jobs as their user)"
    if not sys.platform.startswith("linux"):
        return "the localhost Slurm cluster needs Linux"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _stop(proc: subprocess.Popen, name: str) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def _kill_leftovers(conf: Path) -> list[str]:
    """Processes that our slurmd started (slurmstepd, job tasks) and that outlived the cluster: they
    carry our SLURM_CONF in their environment. Killed by PID; returned for the report."""
    try:
        import psutil
    except ImportError:
        return []
    killed = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("SLURM_CONF") != str(conf):
                continue
            killed.append(f"{proc.pid} {proc.name()}")
            os.kill(proc.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            continue
    return killed


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _missing_reason()
    if reason:
        pytest.skip(reason)
    # A short path: munge's socket path must fit a sockaddr_un (108 bytes).
    base = Path(tempfile.mkdtemp(prefix="longgen-slurm-"))
    base.chmod(0o755)
    conf = base / "slurm.conf"
    procs: list[tuple[str, subprocess.Popen]] = []
    cluster = SlurmCluster(base=base, conf=conf)
    try:
        (base / "munge").mkdir(mode=0o755)
        (base / "state").mkdir()
        (base / "spool").mkdir()
        key = base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        host = os.uname().nodename.split(".")[0]
        conf.write_text(
            SLURM_CONF.format(
                base=base, host=host, node=NODE, ctld_port=_free_port(), slurmd_port=_free_port()
            )
        )
        env = cluster.env()

        def start(name: str, *args: str) -> None:
            log = open(base / f"{name}.out", "wb")  # noqa: SIM115 (closed with the process)
            proc = subprocess.Popen(
                [_binary(name), *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            log.close()
            procs.append((name, proc))

        munge = base / "munge"
        start(
            "munged",
            "--foreground",
            "--force",
            f"--socket={munge}/munge.socket",
            f"--key-file={key}",
            f"--log-file={munge}/munged.log",
            f"--pid-file={munge}/munged.pid",
            f"--seed-file={munge}/seed",
        )
        _wait(lambda: (munge / "munge.socket").exists(), timeout_s=30, what="munged's socket")
        start("slurmctld", "-D", "-i")
        start("slurmd", "-D", "-N", NODE)

        def idle():
            for name, proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited {proc.returncode}: {(base / f'{name}.out').read_text()[-2000:]}"
                    )
            return cluster.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False).stdout.strip() == "idle"

        _wait(idle, timeout_s=60, what="the localhost node to be idle")
        yield cluster
    finally:
        try:
            if any(name == "slurmctld" for name, _ in procs):
                ids = cluster.job_ids()
                if ids:
                    cluster.run("scancel", *map(str, ids), check=False)
                    try:
                        _wait(lambda: not cluster.job_ids(), timeout_s=60, what="cancelled jobs to end")
                    except TimeoutError:
                        pass
        finally:
            for name, proc in reversed(procs):  # slurmd, slurmctld (and its slurmscriptd), munged
                _stop(proc, name)
            leftovers = _kill_leftovers(conf)
            shutil.rmtree(base, ignore_errors=True)
            if leftovers:
                print(f"slurm_cluster: killed processes left by the cluster: {leftovers}", file=sys.stderr)


@pytest.fixture(scope="session")
def repo_clone(tmp_path_factory):
    """The files git tracks (current content) in a temp folder: what `git clone` gives a user."""
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout ({proc.stderr.strip()}): cannot build a fresh-clone copy")
    dest = tmp_path_factory.mktemp("clone")
    for rel in filter(None, proc.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest
