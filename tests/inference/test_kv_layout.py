"""The cache layouts keep exactly what the training mask lets the next query see, each key in its own slot."""

import pytest
import torch

from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern
from megatron_longgen.inference.kv_layout import FullLayout, keep_mask, layout_for

PATTERNS = [
    SinkWindowPattern(block_size=4, num_sink_blocks=1, num_window_blocks=3),
    SinkWindowPattern(block_size=3, num_sink_blocks=2, num_window_blocks=2),
    SinkWindowPattern(block_size=4, num_sink_blocks=0, num_window_blocks=1),
    BlockStridedPattern(block_size=4, stride_blocks=3, num_local_blocks=2),
    BlockStridedPattern(block_size=2, stride_blocks=4, num_local_blocks=1),
    BlockStridedPattern(block_size=4, stride_blocks=1, num_local_blocks=3),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.mask_fn().__name__)
def test_kept_set_is_what_the_next_query_sees(pattern):
    layout = layout_for(pattern)
    dense = pattern.dense_mask(90)  # the training mask, [S, S]
    for length in range(1, 89):
        expected = dense[length, :length].nonzero().flatten().tolist()  # keys the query at `length` sees
        kept = layout.kept_positions(length).tolist()
        assert kept == expected, f"length {length}"
        # Later queries see none of the dropped keys.
        dropped = sorted(set(range(length)) - set(kept))
        assert not dense[length:, dropped].any()


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.mask_fn().__name__)
def test_slots_are_distinct_and_within_capacity(pattern):
    layout = layout_for(pattern)
    for length in range(1, 120):
        kept = layout.kept_positions(length)
        slots = layout.slot_of(kept)
        assert len(set(slots.tolist())) == len(kept), f"two kept keys share a slot at length {length}"
        if not len(kept):
            continue  # e.g. a 1-block window at a block boundary: the next query sees only itself
        assert int(slots.max()) < layout.capacity(length)
        # Prefix stability: a slot never moves when the buffer grows for a longer sequence.
        assert int(slots.max()) < layout.capacity(length + 50)
        assert [layout.slot_of(int(p)) for p in kept[:5]] == slots[:5].tolist()


def test_sink_window_capacity_is_bounded_and_full_is_not():
    sw = layout_for(SinkWindowPattern(block_size=64, num_sink_blocks=1, num_window_blocks=32))
    assert sw.capacity(131072) == 33 * 64 and sw.capacity(100) == 128
    bs = layout_for(BlockStridedPattern(block_size=64, stride_blocks=64, num_local_blocks=1))
    assert bs.capacity(131072) == (1 + 32) * 64  # 32 strided blocks + 1 local block at 128K
    assert FullLayout().capacity(131072) == 131072


def test_keep_mask_matches_dense_training_mask():
    pattern = PATTERNS[3]
    pos = torch.arange(40)
    dense = pattern.dense_mask(40)
    assert torch.equal(keep_mask(pattern, q_pos=pos[:, None], k_pos=pos[None, :]), dense)
    assert not keep_mask(pattern, q_pos=pos[:, None], k_pos=torch.full((1, 40), -1)).any()
