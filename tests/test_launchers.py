"""Launch scripts: syntax, the DRY_RUN validation path, and the local launcher with 2 gloo ranks (DP=2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["slurm/train.sbatch", "slurm/llama2_7b_128k.sh", "slurm/llama2_70b_128k.sh", "slurm/run_local.sh"]


def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_recipe_scripts_request_what_their_recipe_needs():
    for script, nodes in [("slurm/llama2_7b_128k.sh", 32), ("slurm/llama2_70b_128k.sh", 32)]:
        text = (ROOT / script).read_text()
        assert f"#SBATCH --nodes={nodes}" in text and "#SBATCH --signal=B:USR1@180" in text
        assert "/home/" not in text and "/scratch/" not in text  # no personal paths


def test_dry_run_validates_the_70b_layout():
    proc = subprocess.run(["bash", "slurm/llama2_70b_128k.sh"], cwd=ROOT, capture_output=True, text=True,
                          env=_env(DRY_RUN=1, LONGGEN_HOME=ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 256 = tp 8 x pp 4 x cp 2 x dp 4" in proc.stdout
    assert "launch OK" in proc.stdout


def test_dry_run_rejects_a_bad_allocation():
    proc = subprocess.run(["bash", "slurm/train.sbatch"], cwd=ROOT, capture_output=True, text=True,
                          env=_env(DRY_RUN=1, RECIPE="llama2_7b_128k", NNODES=3, LONGGEN_HOME=ROOT), timeout=120)
    assert proc.returncode == 2
    assert "global_batch_size 32 must be a multiple of micro_batch_size * dp = 1 * 3 on 24 GPUs" in proc.stderr


def test_run_local_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    args = "--max-steps 4 --quiet --override train.seq_length=128 train.log_interval=2 train.global_batch_size=4"
    proc = subprocess.run(["bash", "slurm/run_local.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env(RECIPE="debug_tiny", GPUS_PER_NODE=2, RUN_DIR=run_dir, EXTRA_ARGS=args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert json.loads((run_dir / "config.json").read_text())["name"] == "debug_tiny"
