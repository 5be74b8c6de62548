"""Numerical regression: the tiny run's first losses against a committed golden file.

`tests/assets/losses/debug_tiny_cpu.txt` holds one "step loss" per line for both sparse variants and the full
baseline (fp32, CPU, fixed seed). A refactor that should not change numerics must keep them (tolerance 1e-4
only absorbs BLAS differences between CPUs); a change that does must regenerate the file on purpose:

    LONGGEN_UPDATE_GOLDEN=1 python -m pytest tests/training/test_golden_losses.py

The sparse settings are debug_tiny's (16-token blocks; window 4 blocks; stride 4 blocks, 2 local), so at
the tests' 128 tokens sink_window evicts and block_strided reaches a block through the stride that its
local window does not cover: a window or stride that is off changes the losses (a doubled stride moved
block_strided's step-6 loss by 1.8e-3, 18x the tolerance, when this was set up).
"""

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from megatron_longgen.attention.masks import BlockStridedPattern, pattern_from_config
from megatron_longgen.recipes import debug_tiny
from tests.attention.independent_masks import independent_token_mask
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
            name, _step, loss = line.split()
            table.setdefault(name, []).append(float(loss))
    return table


def test_losses_match_golden_file(losses):
    if os.environ.get("LONGGEN_UPDATE_GOLDEN") == "1":
        lines = ["# run step loss (tests/training/test_golden_losses.py; fp32 CPU, seed 1234)"]
        lines += [
            f"{name} {i + 1} {loss:.6f}" for name, values in losses.items() for i, loss in enumerate(values)
        ]
        GOLDEN.write_text("\n".join(lines) + "\n")
    golden = _read()
    assert set(golden) == set(RUNS)
    for name, values in losses.items():
        assert len(values) == STEPS == len(golden[name])
        for step, (got, want) in enumerate(zip(values, golden[name]), start=1):
            assert got == pytest.approx(want, abs=1e-4), f"{name} step {step}: {got} != golden {want}"
    # The variants really differ (the file would not catch a pattern silently falling back to full).
    assert golden["sink_window"][-1] != golden["full"][-1] != golden["block_strided"][-1]


def _masks(cfg, seq_len):
    patterns = {
        v: pattern_from_config(dataclasses.replace(cfg.sparse, variant=v))
        for v in ("sink_window", "block_strided")
    }
    return patterns, {v: independent_token_mask(p, seq_len) for v, p in patterns.items()}


@pytest.mark.parametrize("where", ["golden", "recipe"])
def test_tiny_variants_attend_different_pairs_and_cross_stride_blocks(where):
    """The golden runs (128 tokens) and the recipe's tiny run (1,024) exercise what makes each variant:
    sink_window evicts, block_strided sees blocks through the stride beyond its local window, the two
    attend different (query, key) pairs, and a doubled stride or a wider window would change them."""
    cfg = tiny_config() if where == "golden" else debug_tiny()
    S = cfg.train.seq_length
    patterns, masks = _masks(cfg, S)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    assert not torch.equal(masks["sink_window"], masks["block_strided"])
    for variant, mask in masks.items():
        assert int(mask.sum()) < int(causal.sum()), f"{variant} is dense at {S} tokens"
    b, stride, local = cfg.sparse.block_size, cfg.sparse.stride_blocks, cfg.sparse.num_local_blocks
    nb = S // b
    strided = [kb for kb in range(stride, nb, stride)]  # stride blocks after the sink block 0
    assert strided, f"no stride block after block 0 at {S} tokens"
    reached = [kb for kb in strided if bool(masks["block_strided"][(kb + local) * b :, kb * b].any())]
    assert reached, "no query sees a stride block outside its local window"
    if where == "recipe":
        assert len(strided) + 1 == S // (b * stride) == 16
    doubled = BlockStridedPattern(block_size=b, stride_blocks=2 * stride, num_local_blocks=local)
    assert not torch.equal(independent_token_mask(doubled, S), masks["block_strided"])
    wider = dataclasses.replace(patterns["sink_window"], num_window_blocks=cfg.sparse.num_window_blocks + 1)
    assert not torch.equal(independent_token_mask(wider, S), masks["sink_window"])
