"""Numerical regression: the tiny run's first losses against a committed golden file.

`tests/assets/losses/debug_tiny_cpu.txt` holds one "step loss" per line for both sparse variants and the full
baseline (fp32, CPU, fixed seed). A refactor that should not change numerics must keep them (tolerance 1e-4
only absorbs BLAS differences between CPUs); a change that does must regenerate the file on purpose:

    LONGGEN_UPDATE_GOLDEN=1 python -m pytest tests/training/test_golden_losses.py
"""

import os
from pathlib import Path

import pytest

from tests.training.tiny import tiny_config

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "losses" / "debug_tiny_cpu.txt"
STEPS = 6
RUNS = {
    "sink_window": ("sparse.variant=sink_window",),
    "block_strided": ("sparse.variant=block_strided",),
    "full": ("model.layer_pattern=FFFF",),
}


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    from megatron_longgen.training.trainer import Trainer

    out = {}
    for name, extra in RUNS.items():
        cfg = tiny_config(f"train.max_steps={STEPS}", "train.save_on_exit=false", "train.dtype=fp32", *extra)
        out[name] = Trainer(cfg, run_dir=tmp_path_factory.mktemp(name), quiet=True).fit().losses
    return out


def _read() -> dict[str, list[float]]:
    table: dict[str, list[float]] = {}
    for line in GOLDEN.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, step, loss = line.split()
            table.setdefault(name, []).append(float(loss))
    return table


def test_losses_match_golden_file(losses):
    if os.environ.get("LONGGEN_UPDATE_GOLDEN") == "1":
        lines = ["# run step loss (tests/training/test_golden_losses.py; fp32 CPU, seed 1234)"]
        lines += [f"{name} {i + 1} {loss:.6f}" for name, values in losses.items() for i, loss in enumerate(values)]
        GOLDEN.write_text("\n".join(lines) + "\n")
    golden = _read()
    assert set(golden) == set(RUNS)
    for name, values in losses.items():
        assert len(values) == STEPS == len(golden[name])
        for step, (got, want) in enumerate(zip(values, golden[name]), start=1):
            assert got == pytest.approx(want, abs=1e-4), f"{name} step {step}: {got} != golden {want}"
    # The variants really differ (the file would not catch a pattern silently falling back to full).
    assert golden["sink_window"][-1] != golden["full"][-1] != golden["block_strided"][-1]
