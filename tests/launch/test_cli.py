"""`tools/plan_parallelism.py` and `tools/check_launch.py` as users run them: output, exit status, errors."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.fixtures import production_env, subprocess_env

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

ROOT = Path(__file__).resolve().parents[2]


def _run(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"tools/{tool}", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env({"PYTHONPATH": str(ROOT), **(env or {})}),
    )


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error:" in line]


def test_planner_cli_ranks_the_70b_layouts_and_marks_what_fits():
    proc = _run(
        "plan_parallelism.py",
        "--recipe",
        "llama2_70b_128k",
        "--gpus",
        "64",
        "--gpu",
        "h100-80gb",
        "--top",
        "40",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "llama2_70b_128k (80 layers, seq 131072, global batch 32) on 64 x NVIDIA H100 SXM5 80GB" in out
    rows = re.findall(
        r"^\s+(\d+)\s+TP(\d+) PP(\d+) CP(\d+) DP(\d+)\s+(\w+)\s+(\d+)\s+([\d.]+)\s+(\d+%)( OOM)?\s+"
        r"([\d.]+)\s+(\d+)",
        out,
        flags=re.MULTILINE,
    )
    assert len(rows) == 40 and [int(r[0]) for r in rows] == list(range(1, 41))
    fits = [not r[9] for r in rows]
    assert fits[0] and not fits[-1] and fits == sorted(fits, reverse=True)  # fitting layouts first
    # Within the layouts that leave 10% free, faster first.
    comfortable = [int(r[11]) for r in rows if not r[9] and int(r[8][:-1]) <= 90]
    assert comfortable == sorted(comfortable, reverse=True)
    assert (
        "recommended (fits with 10% headroom" in out and "layout tp 8 pp 1 cp 8 dp 1, recompute full" in out
    )
    longgen = re.search(r"LongGen\s+llama2_70b_128k\s+(\d+) tokens/s/GPU\s+MFU ([\d.]+)", out)
    full = re.search(r"full\s+llama2_70b_128k_full\s+(\d+) tokens/s/GPU\s+MFU ([\d.]+)", out)
    assert longgen and full and int(longgen.group(1)) > int(full.group(1))
    assert "recipe's layout (TP8 PP1 CP8 DP1, recompute full): rank" in out
    assert "more than the signal lead time of 180 s" in out


def test_planner_cli_bad_numbers_are_one_line_errors():
    for args, message in (
        (
            ["--recipe", "llama2_70b_128k", "--gpus", "0"],
            "--gpus, --gpus-per-node and --top must be >= 1, got 0",
        ),
        (
            ["--recipe", "llama2_70b_128k", "--gpus", "64", "--headroom", "1.5"],
            "--headroom and --tie must be in",
        ),
        (
            ["--recipe", "llama2_70b_128k", "--gpus", "64", "--override", "train.seq_length=x"],
            "override train.seq_length='x': expected int",
        ),
    ):
        proc = _run("plan_parallelism.py", *args)
        assert proc.returncode == 2 and len(_errors(proc)) == 1 and message in proc.stderr, proc.stderr


def test_check_launch_bad_allocation_numbers():
    proc = _run("check_launch.py", "--recipe", "llama2_70b_128k", "--nodes", "0")
    assert proc.returncode == 2
    assert _errors(proc) == ["check_launch: error: --nodes must be >= 1, got 0"]
    proc = _run("check_launch.py", "--recipe", "debug_tiny", "--gpus-per-node", "-1", "--signal-lead-s", "0")
    assert proc.returncode == 2 and len(_errors(proc)) == 2


def test_check_launch_honours_every_longgen_train_flag():
    proc = _run(
        "check_launch.py",
        "--recipe",
        "debug_tiny",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--gpu",
        "none",
        "--run-dir",
        "runs/x",
        "--resume",
        "--max-steps",
        "7",
        "--attention",
        "full",
        "--quiet",
        "--override",
        "train.global_batch_size=8",
        "train.seq_length=512",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pattern FFFFFF" in proc.stdout and "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in proc.stdout
    assert "global batch 8 x 512 tokens = 4,096 tokens/step; 2 micro-batches of 2 per DP rank" in proc.stdout
    assert proc.stdout.rstrip().endswith("launch OK")
    bad = _run("check_launch.py", "--recipe", "debug_tiny", "--gpu", "none", "--override", "train.lr")
    assert bad.returncode == 2 and "must look like section.field=value" in bad.stderr


def test_check_launch_refuses_the_7b_recipe_without_its_inputs():
    proc = _run("check_launch.py", "--recipe", "llama2_7b_128k", "--nodes", "8", "--gpu", "none")
    assert proc.returncode == 2
    errors = _errors(proc)
    assert len(errors) == 3 and all("llama2_7b_128k needs" in e for e in errors)
    assert "world 64 = tp 2 x pp 1 x cp 1 x dp 32" in proc.stdout  # what it learnt is still printed


def test_check_launch_passes_a_complete_production_launch(tmp_path):
    from megatron_longgen.recipes import get_recipe

    env = production_env(tmp_path, get_recipe("llama2_7b_128k"), tokens=600_000_000)
    proc = _run(
        "check_launch.py", "--recipe", "llama2_7b_128k", "--nodes", "8", "--max-steps", "100", env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan on NVIDIA H100 SXM5 80GB" in proc.stdout and "launch OK" in proc.stdout
    # 100 steps x 32 sequences = 3,200 of the 4,577 sequences of 131,072 in a 600M-token blend: no data warning.
    assert (
        "4,577 sequences/epoch -> 0.70 epochs over the run" in proc.stdout
        and "data repeats" not in proc.stdout
    )


def test_validate_mode_writes_the_table(tmp_path):
    for name in ("train_step_h200.json", "context_parallel_h200.json"):
        shutil.copy(ROOT / "benchmarks" / "results" / name, tmp_path / name)
    proc = _run("plan_parallelism.py", "--validate", "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "planner_validation_h200.md").read_text()
    assert "| train_step_h200.json | SSFFSS | 131072 | full | triton |" in table
    assert (tmp_path / "planner_validation_h200.json").is_file()
    empty = _run("plan_parallelism.py", "--validate", "--results-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "no *h200*.json results" in empty.stderr
