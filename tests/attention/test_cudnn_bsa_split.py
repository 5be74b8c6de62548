"""The split of a pattern between cuDNN's dense tiles and the Triton remainder (kernels/cudnn_bsa.py).

Block level only (CPU): the cuDNN metadata (tile index, counts, block_sizes) rebuilt into a block mask,
plus the remainder, must give back the pattern exactly, with no block pair computed twice. The numerics
of the composition run in test_kernels.py (Triton interpreter) and test_kernels_gpu.py (cuDNN on a GPU).
"""

import pytest
import torch

from megatron_longgen.attention.backends import resolve_backend
from megatron_longgen.attention.kernels import available_kernels
from megatron_longgen.attention.kernels.cudnn_bsa import TileRemainder, full_tile_index
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern, block_mask_matrix

PATTERNS = [
    SinkWindowPattern(),
    BlockStridedPattern(),
    SinkWindowPattern(num_sink_blocks=2, num_window_blocks=5),
    SinkWindowPattern(num_sink_blocks=3, num_window_blocks=4),
    BlockStridedPattern(stride_blocks=4, num_local_blocks=2),
]


def _blocks_from_index(ti, seq_len, block):
    nb, r = seq_len // block, ti.tile // block
    got = torch.zeros(nb, nb, dtype=torch.int32)
    for qt in range(seq_len // ti.tile):
        for j in range(int(ti.counts[0, 0, qt])):
            kt = int(ti.index[0, 0, qt, j])
            tokens = ti.tile if ti.block_sizes is None else int(ti.block_sizes[kt])
            got[qt * r : (qt + 1) * r, kt * r : kt * r + tokens // block] += 1
    return got


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: repr(p))
@pytest.mark.parametrize("tile", [64, 128])
def test_dense_tiles_plus_remainder_is_the_pattern(pattern, tile):
    seq_len = tile * 72  # past the 32-block window and the 64-block stride
    nb = seq_len // pattern.block_size
    ti = full_tile_index(pattern, seq_len, tile, batch=2, heads=3, device="cpu")
    assert ti.index.shape[:3] == (2, 3, seq_len // tile) and ti.index.dtype == torch.int32
    assert torch.equal(ti.counts[1, 2], ti.counts[0, 0])
    dense = _blocks_from_index(ti, seq_len, pattern.block_size)
    rest = block_mask_matrix(TileRemainder(pattern, tile), nb)
    base = block_mask_matrix(pattern, nb)
    assert dense.max() <= 1, "a block pair is listed twice"
    assert not (dense.bool() & rest).any(), "a block pair is computed by both kernels"
    assert torch.equal(dense.bool() | rest, base)
    # the dense tiles never touch the diagonal (cuDNN's kernel is not causal)
    assert not dense.bool().diagonal().any()


def test_sink_ending_inside_a_tile_goes_to_cudnn_as_a_prefix():
    """1 sink block in 128-token tiles: cuDNN takes the sink half of key tile 0 for every later query tile
    (block_sizes[0] = 64); otherwise that column (seen by every query) would be one long Triton program."""
    pattern = SinkWindowPattern()
    ti = full_tile_index(pattern, 128 * 40, 128, batch=1, heads=1, device="cpu")
    assert ti.block_sizes is not None and ti.block_sizes[0].item() == 64 and (ti.block_sizes[1:] == 128).all()
    rows_with_tile0 = (ti.index[0, 0] == 0) & (torch.arange(ti.index.shape[-1]) < ti.counts[0, 0, :, None])
    assert rows_with_tile0[1:].any(dim=1).all()  # every query tile after the first lists the sink
    rest = block_mask_matrix(TileRemainder(pattern, 128), 80)
    assert not rest[2:, 0].any()  # ... so the remainder keeps no sink block


def test_lengths_that_do_not_divide_the_tile_are_refused():
    with pytest.raises(ValueError, match="5000 must be a multiple of the cuDNN tile 128"):
        full_tile_index(SinkWindowPattern(), 5000, 128, batch=1, heads=1, device="cpu")
    with pytest.raises(ValueError, match="multiple of the pattern block"):
        TileRemainder(SinkWindowPattern(), 96)


def test_cudnn_bsa_is_unavailable_on_cpu_and_says_why():
    cls = available_kernels()["cudnn_bsa"]
    assert cls.unavailable_reason(device=torch.device("cpu"), dtype=torch.bfloat16) is not None
    with pytest.raises(ValueError, match="'cudnn_bsa' .*cannot run on cpu"):
        resolve_backend(
            kind="sparse", requested="cudnn_bsa", device="cpu", dtype=torch.bfloat16, pattern=PATTERNS[0]
        )
    with pytest.raises(ValueError, match="backward must be 'cudnn' or 'triton'"):
        cls(backward="flash")
