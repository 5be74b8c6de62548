"""The README's main job on a GPU, end to end: the `debug_tiny` recipe trains on CUDA (fp32, whose sparse
layers `auto`-resolve to a backend that accepts 16-token blocks), and in bf16 its losses match a committed
golden file (`tests/assets/losses/debug_tiny_h200_bf16.txt`, written on an H200 with torch 2.11).

The tolerance is relative 5e-3: bf16 atomics and kernel choices may move a 12-step run a little between runs,
while the golden variants differ from each other by more (full vs sink_window by 0.8% at step 8, vs
block_strided by 1.5% at step 6), so a pattern that silently fell back to full attention, or a wrong
window or stride, fails. Another GPU or software stack rounds differently: regenerate there, on purpose, with

    LONGGEN_UPDATE_GOLDEN=1 python -m pytest -m gpu tests/training/test_golden_losses_gpu.py

(`LONGGEN_GOLDEN_OUT=PATH` writes the new file elsewhere, e.g. to bring it back from a remote GPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_longgen.config import apply_overrides
from megatron_longgen.recipes import debug_tiny

pytestmark = pytest.mark.gpu

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "losses" / "debug_tiny_h200_bf16.txt"
STEPS = 12
TOL = 5e-3
RUNS = {
    "sink_window": ("sparse.variant=sink_window",),
    "block_strided": ("sparse.variant=block_strided",),
    "full": ("model.layer_pattern=FFFFFF",),
}


def _cfg(*extra: str):
    return apply_overrides(
        debug_tiny(), [f"train.max_steps={STEPS}", "train.save_on_exit=false", "train.log_interval=1", *extra]
    )


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from megatron_longgen.training.trainer import Trainer

    out = {}
    for name, extra in RUNS.items():
        cfg = _cfg("train.dtype=bf16", *extra)
        trainer = Trainer(cfg, run_dir=tmp_path_factory.mktemp(name), quiet=True)
        out[name] = trainer.fit().losses
    return out


def test_tiny_recipe_runs_on_cuda_in_fp32(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from megatron_longgen.attention.core_attention import attention_backend_summary
    from megatron_longgen.training.trainer import Trainer

    trainer = Trainer(apply_overrides(_cfg(), ["train.max_steps=3"]), run_dir=tmp_path / "fp32", quiet=True)
    summary = attention_backend_summary(trainer.model)
    assert "sparse layers -> " in summary and "-> torch" not in summary, summary
    losses = trainer.fit().losses
    assert len(losses) == 3 and all(loss == loss for loss in losses)


def _read(path: Path) -> dict[str, list[float]]:
    table: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _step, loss = line.split()
            table.setdefault(name, []).append(float(loss))
    return table


def test_bf16_losses_match_golden_file(bf16_losses):
    if os.environ.get("LONGGEN_UPDATE_GOLDEN") == "1":
        target = Path(os.environ.get("LONGGEN_GOLDEN_OUT", GOLDEN))
        device = torch.cuda.get_device_name()
        lines = [
            f"# run step loss (tests/training/test_golden_losses_gpu.py; bf16 {device}, torch "
            f"{torch.__version__}, seed 1234)"
        ]
        lines += [
            f"{name} {i + 1} {loss:.6f}"
            for name, values in bf16_losses.items()
            for i, loss in enumerate(values)
        ]
        target.write_text("\n".join(lines) + "\n")
        if target != GOLDEN:
            return
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing: regenerate it with LONGGEN_UPDATE_GOLDEN=1 on a GPU")
    golden = _read(GOLDEN)
    assert set(golden) == set(RUNS)
    for name, values in bf16_losses.items():
        assert len(values) == STEPS == len(golden[name])
        for step, (got, want) in enumerate(zip(values, golden[name]), start=1):
            assert got == pytest.approx(want, rel=TOL), f"{name} step {step}: {got} != golden {want}"
        assert values[-1] < values[0]
    for variant in ("sink_window", "block_strided"):  # the file itself tells the variants apart
        spread = max(abs(a - b) / b for a, b in zip(golden[variant], golden["full"]))
        assert spread > 1.5 * TOL, f"golden {variant} is within {spread:.2e} of full attention"
