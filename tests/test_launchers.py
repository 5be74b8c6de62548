"""Launch scripts: syntax, the DRY_RUN validation path, and the local launcher with 2 gloo ranks (DP=2)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import train_cmd

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/train.sbatch", "slurm/llama2_7b_128k.sh", "slurm/llama2_70b_128k.sh", "slurm/run_local.sh"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGGEN_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_recipe_scripts_request_what_their_recipe_needs():
    # 70B: a step (~119 s) plus a save (~97 s) on 64 H100s outlasts the default 180 s lead (the planner warns).
    for script, nodes, lead in [("slurm/llama2_7b_128k.sh", 8, 180), ("slurm/llama2_70b_128k.sh", 8, 360)]:
        text = (ROOT / script).read_text()
        assert f"#SBATCH --nodes={nodes}" in text and f"#SBATCH --signal=B:USR1@{lead}" in text
        # The script's own timer (SIGNAL_LEAD_S) and the launch check use the same lead as Slurm's --signal.
        assert lead == 180 or f"SIGNAL_LEAD_S=${{SIGNAL_LEAD_S:-{lead}}}" in text
        assert "/home/" not in text and "/scratch/" not in text  # no personal paths


def test_dry_run_validates_the_70b_layout(tmp_path):
    from megatron_longgen.recipes import get_recipe
    from tests.launch.fixtures import production_env

    # The production inputs come from the LONGGEN_* variables the job script exports (a 32K-vocabulary
    # tokenizer, a 5.1B-token blend whose .bin is sparse, a checkpoint folder of the 70B shape).
    inputs = production_env(tmp_path, get_recipe("llama2_70b_128k"), tokens=5_100_000_000)
    proc = subprocess.run(
        ["bash", "slurm/llama2_70b_128k.sh"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(DRY_RUN=1, LONGGEN_HOME=ROOT, **inputs),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 64 = tp 8 x pp 1 x cp 8 x dp 1" in proc.stdout
    assert "plan on NVIDIA H100 SXM5 80GB" in proc.stdout
    assert "launch OK" in proc.stdout


def test_dry_run_refuses_the_70b_recipe_without_its_inputs():
    proc = subprocess.run(
        ["bash", "slurm/llama2_70b_128k.sh"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(DRY_RUN=1, LONGGEN_HOME=ROOT),
        timeout=300,
    )
    assert proc.returncode == 2
    for flag, var in (
        ("--data-blend", "LONGGEN_DATA_BLEND"),
        ("--tokenizer", "LONGGEN_TOKENIZER"),
        ("--init-checkpoint", "LONGGEN_INIT_CHECKPOINT"),
    ):
        assert flag in proc.stderr and var in proc.stderr


def test_dry_run_rejects_a_bad_allocation():
    proc = subprocess.run(
        ["bash", "slurm/train.sbatch"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(DRY_RUN=1, RECIPE="llama2_7b_128k", NNODES=3, LONGGEN_HOME=ROOT),
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        "global_batch_size 32 must be a multiple of micro_batch_size * dp = 1 * 12 on 24 GPUs" in proc.stderr
    )


def _dry_run_passes_extra_args() -> bool:
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    return any("check_launch.py" in line and "EXTRA_ARGS" in line for line in text.splitlines())


@pytest.mark.skipif(
    not _dry_run_passes_extra_args(),
    reason="slurm/train.sbatch does not pass $EXTRA_ARGS to tools/check_launch.py yet",
)
def test_dry_run_checks_what_extra_args_will_train(tmp_path):
    from megatron_longgen.recipes import get_recipe
    from tests.launch.fixtures import production_env

    inputs = production_env(tmp_path, get_recipe("llama2_7b_128k"), tokens=600_000_000)
    tokenizer = inputs.pop("LONGGEN_TOKENIZER")
    extra = f"--tokenizer {tokenizer} --max-steps 100 --override train.global_batch_size=64"
    proc = subprocess.run(
        ["bash", "slurm/train.sbatch"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(DRY_RUN=1, RECIPE="llama2_7b_128k", NNODES=8, LONGGEN_HOME=ROOT, EXTRA_ARGS=extra, **inputs),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "global batch 64 x 131072 tokens" in proc.stdout and "launch OK" in proc.stdout
    bad = subprocess.run(
        ["bash", "slurm/train.sbatch"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(
            DRY_RUN=1,
            RECIPE="llama2_7b_128k",
            NNODES=8,
            LONGGEN_HOME=ROOT,
            EXTRA_ARGS=extra + " --max-steps 5000",
            **inputs,
        ),
    )
    assert bad.returncode == 2 and "above the limit of 4 epochs" in bad.stderr


def test_run_local_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    args = (
        "--max-steps 4 --quiet --override train.seq_length=128 train.log_interval=2 train.global_batch_size=4"
    )
    proc = subprocess.run(
        ["bash", "slurm/run_local.sh"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(RECIPE="debug_tiny", GPUS_PER_NODE=2, RUN_DIR=run_dir, EXTRA_ARGS=args),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert json.loads((run_dir / "config.json").read_text())["name"] == "debug_tiny"


def test_srun_style_ranks_from_slurm_variables(tmp_path):
    # What `srun --ntasks-per-node=2 python -m megatron_longgen.train ...` does: two tasks that know their
    # rank only from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, plus MASTER_ADDR/PORT from train.sbatch.
    from megatron_longgen.utils.distributed import free_port

    run_dir = tmp_path / "run"
    port = free_port()
    base = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    procs = []
    for rank in range(2):
        env = dict(
            base,
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        cmd = train_cmd(
            run_dir,
            "--max-steps",
            "2",
            "--quiet",
            "--override",
            "train.seq_length=128",
            "train.global_batch_size=4",
            "train.log_interval=1",
        )
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # Both tasks joined one job: throughput per GPU is half the total.
    assert rows[-1]["tokens_per_s_per_gpu"] == pytest.approx(rows[-1]["tokens_per_s"] / 2)


def test_train_sbatch_outside_slurm_points_to_the_local_launcher(tmp_path):
    env = {
        k: v
        for k, v in _env(RECIPE="debug_tiny", RUN_DIR=tmp_path / "run").items()
        if not k.startswith("SLURM_")
    }
    proc = subprocess.run(
        ["bash", "slurm/train.sbatch"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "not inside a Slurm job" in proc.stderr and "slurm/run_local.sh" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(600)
def test_run_local_sigterm_saves_and_exits_zero(tmp_path):
    """A signal to slurm/run_local.sh reaches the ranks, not torchrun (which would exit 1 with a traceback
    after its workers saved): the job saves at the end of a step and every process exits 0."""
    run_dir = tmp_path / "run"
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "slurm/run_local.sh"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(
                RECIPE="debug_tiny",
                GPUS_PER_NODE=2,
                RUN_DIR=run_dir,
                OMP_NUM_THREADS=1,
                EXTRA_ARGS="--max-steps 500 --override train.log_interval=1",
            ),
        )
        deadline = time.monotonic() + 400
        while "step     1/500" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert "step     1/500" in log.read_text(), log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=300)
    text = log.read_text()
    assert status == 0, text[-3000:]
    assert "preemption signal SIGTERM: saved" in text and "Traceback" not in text, text[-3000:]
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert saved.startswith("step_") and 1 <= int(saved.split("_")[1]) < 500
