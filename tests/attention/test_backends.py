"""The one backend resolver (attention/backends.py): pattern-aware `auto`, named backends that say why not,
the CP forms, logging once. CPU only: CUDA devices are described, not used (the kernels' availability
checks read the device type, the dtype, the pattern and the head dim; the compute capability and the
optional cuDNN frontend are faked where a test needs a Hopper GPU).
"""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_longgen.attention import backends
from megatron_longgen.attention.backends import CANDIDATES, resolve_backend
from megatron_longgen.attention.kernels import available_kernels
from megatron_longgen.attention.kernels.flex import pattern_block_mask
from megatron_longgen.attention.kernels.tiles import check_tiles
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern, pattern_from_config
from megatron_longgen.recipes import debug_tiny
from megatron_longgen.utils.optional import has_triton

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = pattern_from_config(debug_tiny().sparse)  # 16-token blocks
PAPER = SinkWindowPattern()  # 64-token blocks


@pytest.fixture
def hopper(monkeypatch):
    """Describe an H200 with Triton and the cuDNN frontend installed (nothing runs on it)."""
    from megatron_longgen.attention.kernels import cudnn_bsa, triton_block_sparse

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton_block_sparse, "has_triton", lambda: True)
    monkeypatch.setattr(cudnn_bsa, "has_triton", lambda: True)
    monkeypatch.setattr(cudnn_bsa, "has_cudnn_bsa", lambda: True)


def _sparse(dtype, pattern, *, device=CUDA, head_dim=128, requested="auto", cp_size=1):
    return resolve_backend(
        kind="sparse", requested=requested, device=device, dtype=dtype, pattern=pattern, head_dim=head_dim,
        cp_size=cp_size,
    )  # fmt: skip


def test_cpu_resolves_to_the_portable_kernels():
    assert _sparse(torch.float32, TINY, device=CPU).name == "torch"
    assert _sparse(torch.bfloat16, PAPER, device=CPU, cp_size=2).name == "torch"
    full = resolve_backend(kind="full", device=CPU, dtype=torch.float32)
    ring = resolve_backend(kind="full", device=CPU, dtype=torch.float32, cp_size=4)
    assert (full.name, full.form, ring.name, ring.form) == ("sdpa", "local", "math", "ring")
    local = _sparse(torch.float32, TINY, device=CPU)
    assert local.form == "local" and [name for name, _ in local.skipped] == ["cudnn_bsa", "triton", "flex"]
    assert "needs CUDA" in dict(local.skipped)["triton"]


def test_auto_on_hopper_picks_what_accepts_the_pattern(hopper):
    # The paper's pattern at head dim 128, bf16: cuDNN's block-sparse kernels.
    assert _sparse(torch.bfloat16, PAPER).name == "cudnn_bsa"
    # debug_tiny in bf16: cuDNN needs 64-token blocks, Triton's tiles fit 16-token blocks.
    tiny = _sparse(torch.bfloat16, TINY, head_dim=32)
    assert tiny.name == "triton" and "64-token blocks" in dict(tiny.skipped)["cudnn_bsa"]
    # debug_tiny as its recipe runs it (fp32): Triton is bf16/fp16 only, Flex takes fp32 and 16-token blocks.
    tiny32 = _sparse(torch.float32, TINY, head_dim=32)
    assert tiny32.name == "flex" and "float32" in dict(tiny32.skipped)["triton"]
    # cuDNN's backward needs head dim 128.
    assert _sparse(torch.bfloat16, PAPER, head_dim=64).name == "triton"
    # block_strided is accepted by cudnn_bsa (it runs the Triton kernel for it by design).
    assert _sparse(torch.bfloat16, BlockStridedPattern()).name == "cudnn_bsa"


def test_the_h200_crash_is_gone(hopper):
    """The README's tiny run crashed on an H200: `auto` took Flex, whose 128 x 128 tile bits hold at most
    30 block pairs, for 16-token blocks (64 pairs). Whatever `auto` picks now builds its mask."""
    with pytest.raises(ValueError, match="at most 30"):
        check_tiles(TINY, block_m=128, block_n=128)  # the old Flex path
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = _sparse(dtype, TINY, head_dim=32).name
        kernel = available_kernels()[name]()
        if name == "flex":
            mask = pattern_block_mask(TINY, 1024, tile=kernel.tile, device="cpu")
            assert mask.kv_num_blocks.shape == (1, 1, 8)
        elif name == "triton":
            assert kernel.pattern_reason(TINY) is None
            kernel.tables_for(TINY, 1024, "cpu")  # builds without error


def test_auto_falls_back_to_torch_with_a_warning_when_nothing_fast_fits(hopper):
    odd = SinkWindowPattern(block_size=8, num_window_blocks=4)  # Flex needs multiples of 16
    with pytest.warns(UserWarning, match="portable 'torch' kernel"):
        got = _sparse(torch.float32, odd, head_dim=32)
    assert got.name == "torch" and "multiple of 16" in dict(got.skipped)["flex"]
    with pytest.warns(UserWarning, match="portable 'math' kernel"):
        assert resolve_backend(kind="full", device=CUDA, dtype=torch.float32, cp_size=2).name == "math"


@pytest.mark.parametrize(
    "pattern, why",
    [
        (SinkWindowPattern(block_size=2, num_window_blocks=8), "at most 30"),  # 16 x 16 tiles = 64 pairs
        (SinkWindowPattern(block_size=48, num_window_blocks=4), "power of two"),
        (SinkWindowPattern(block_size=96, num_window_blocks=4), "must nest"),
    ],
    ids=["b2", "b48", "b96"],
)
@pytest.mark.filterwarnings("ignore:no fast sparse attention backend")
def test_triton_refuses_patterns_its_tiles_cannot_take(hopper, pattern, why):
    with pytest.raises(ValueError, match=why):
        _sparse(torch.bfloat16, pattern, head_dim=64, requested="triton")
    assert _sparse(torch.bfloat16, pattern, head_dim=64).name != "triton"


def test_named_backends_that_cannot_run_say_why():
    with pytest.raises(ValueError, match="'triton' .*cannot run on cpu.*needs CUDA.*Set it to 'auto'"):
        _sparse(torch.float32, TINY, device=CPU, requested="triton")
    with pytest.raises(ValueError, match="'flex' .*compiled only on CUDA"):
        _sparse(torch.float32, TINY, device=CPU, requested="flex")
    with pytest.raises(ValueError, match="ring step kernel|'flash' .*needs CUDA"):
        resolve_backend(kind="full", requested="flash", device=CPU, dtype=torch.float32, cp_size=2)
    with pytest.raises(ValueError, match="unknown sparse attention backend 'fast'"):
        _sparse(torch.float32, TINY, device=CPU, requested="fast")


def test_named_backend_that_cannot_take_the_pattern_says_why(hopper):
    with pytest.raises(ValueError, match="cudnn_bsa.*64-token blocks"):
        _sparse(torch.bfloat16, TINY, head_dim=32, requested="cudnn_bsa")
    assert _sparse(torch.bfloat16, TINY, head_dim=32, requested="triton").name == "triton"


def test_whole_sequence_backends_have_no_cp_form():
    for name in ("triton", "cudnn_bsa", "cudnn_bsa_fwd"):
        with pytest.raises(ValueError, match=f"'{name}' runs only with the whole sequence.*'exchange' form"):
            _sparse(torch.bfloat16, PAPER, requested=name, cp_size=2)
    with pytest.raises(ValueError, match="'sdpa' runs only with the whole sequence"):
        resolve_backend(kind="full", requested="sdpa", device=CPU, dtype=torch.float32, cp_size=2)
    assert _sparse(torch.bfloat16, PAPER, device=CPU, requested="torch", cp_size=2).form == "exchange"


def test_cp_forms_on_cuda(hopper):
    assert _sparse(torch.bfloat16, TINY, cp_size=2).name == "flex"
    assert _sparse(torch.float32, TINY, cp_size=2).name == "flex"
    assert resolve_backend(kind="full", device=CUDA, dtype=torch.bfloat16, cp_size=2).name == "cudnn"
    assert CANDIDATES[("full", "ring")][-1] == "math" and CANDIDATES[("sparse", "exchange")][-1] == "torch"


def test_every_candidate_is_known():
    registry = available_kernels()
    assert set(CANDIDATES[("sparse", "local")]) <= set(registry)


def test_each_resolution_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="megatron_longgen.attention.backends"):
        for _ in range(3):
            _sparse(torch.float32, TINY, device=CPU)
        resolve_backend(kind="full", device=CPU, dtype=torch.float32)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "sparse layers -> torch (local; requested auto; cpu/float32)" in lines[0]
    assert "full layers -> sdpa (local" in lines[1]


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_triton_pattern_reason_is_device_independent():
    kernel = available_kernels()["triton"]()
    assert kernel.pattern_reason(TINY) is None and kernel.pattern_reason(PAPER) is None
    assert "at most 30" in kernel.pattern_reason(SinkWindowPattern(block_size=2))
