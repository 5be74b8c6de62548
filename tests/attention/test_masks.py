"""Sparse patterns: block rules, token masks and block tables against brute-force definitions."""

import pytest
import torch

from megatron_longgen.attention.masks import (
    BlockStridedPattern,
    SinkWindowPattern,
    attended_pairs,
    dense_block_strided_mask,
    dense_sink_window_mask,
    kv_block_table,
    keys_per_query,
    num_blocks,
)


def brute_sink_window(S, b, sink, window):
    m = torch.zeros(S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(i + 1):
            qb, kb = i // b, j // b
            m[i, j] = kb < sink or qb - kb < window
    return m


def brute_block_strided(S, b, stride, local):
    m = torch.zeros(S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(i + 1):
            qb, kb = i // b, j // b
            m[i, j] = qb - kb < local or kb % stride == 0
    return m


PATTERNS = [
    (SinkWindowPattern(block_size=4, num_sink_blocks=1, num_window_blocks=3), lambda S: brute_sink_window(S, 4, 1, 3)),
    (SinkWindowPattern(block_size=3, num_sink_blocks=2, num_window_blocks=1), lambda S: brute_sink_window(S, 3, 2, 1)),
    (BlockStridedPattern(block_size=4, stride_blocks=3, num_local_blocks=2), lambda S: brute_block_strided(S, 4, 3, 2)),
    (BlockStridedPattern(block_size=5, stride_blocks=2, num_local_blocks=1), lambda S: brute_block_strided(S, 5, 2, 1)),
]


@pytest.mark.parametrize("pattern, brute", PATTERNS, ids=lambda p: getattr(p, "name", ""))
@pytest.mark.parametrize("seq_len", [1, 7, 24, 37, 64])  # includes lengths that are not multiples of b
def test_dense_mask_matches_brute_force(pattern, brute, seq_len):
    expected = brute(seq_len)
    assert torch.equal(pattern.dense_mask(seq_len), expected)
    # The token-level mask function (FlexAttention's mask_mod form) agrees too.
    q = torch.arange(seq_len)[:, None]
    k = torch.arange(seq_len)[None, :]
    assert torch.equal(pattern.mask_fn()(0, 0, q, k), expected)


@pytest.mark.parametrize("pattern, brute", PATTERNS, ids=lambda p: getattr(p, "name", ""))
@pytest.mark.parametrize("seq_len", [9, 37, 64])
def test_block_table_covers_exactly_the_kept_blocks(pattern, brute, seq_len):
    b = pattern.block_size
    nb = num_blocks(seq_len, b)
    table = kv_block_table(pattern, nb)
    dense = brute(seq_len)
    for qb in range(nb):
        listed = [int(x) for x in table[qb] if x >= 0]
        assert listed == sorted(set(listed))
        rows = dense[qb * b : min((qb + 1) * b, seq_len)]
        kept = sorted({j // b for j in range(seq_len) if rows[:, j].any()})
        assert listed == kept
    assert table.shape[1] <= pattern.max_kv_blocks(nb)


@pytest.mark.parametrize("pattern, brute", PATTERNS, ids=lambda p: getattr(p, "name", ""))
@pytest.mark.parametrize("seq_len", [13, 64])
def test_keys_per_query_and_pairs(pattern, brute, seq_len):
    dense = brute(seq_len)
    assert torch.equal(keys_per_query(pattern, seq_len), dense.sum(dim=1))
    assert attended_pairs(pattern, seq_len) == int(dense.sum())
    assert attended_pairs(None, seq_len) == seq_len * (seq_len + 1) // 2


def test_paper_budget_at_128k():
    # 1 sink block + 32 window blocks of 64 tokens = 2,112 keys for a query at the end of 128K.
    sw = SinkWindowPattern()
    assert int(keys_per_query(sw, 131072)[-1]) == 2112
    bs = BlockStridedPattern()  # stride 64 blocks, 1 local block: 32 strided blocks + the own block
    assert int(keys_per_query(bs, 131072)[-1]) == 2112
    assert sw.mask_fn().__name__ == "sink_window_b64_s1_w32"
    assert bs.mask_fn().__name__ == "block_strided_b64_st64_l1"


def test_named_dense_factories():
    assert torch.equal(dense_sink_window_mask(40, block_size=4, num_sink_blocks=1, num_window_blocks=3),
                       brute_sink_window(40, 4, 1, 3))
    assert torch.equal(dense_block_strided_mask(40, block_size=4, stride_blocks=3, num_local_blocks=2),
                       brute_block_strided(40, 4, 3, 2))
