"""Sparse patterns: block rules, token masks and block tables against hand-written matrices and against
masks built independently of `block_rule` (tests/attention/independent_masks.py)."""

import pytest
import torch

from megatron_longgen.attention.masks import (
    BlockStridedPattern,
    SinkWindowPattern,
    attended_pairs,
    block_mask_matrix,
    dense_block_strided_mask,
    dense_sink_window_mask,
    keys_per_query,
    kv_block_table,
    num_blocks,
)
from tests.attention.independent_masks import independent_block_mask, independent_token_mask


def brute_sink_window(S, b, sink, window):
    return independent_token_mask(
        SinkWindowPattern(block_size=b, num_sink_blocks=sink, num_window_blocks=window), S
    )


def brute_block_strided(S, b, stride, local):
    return independent_token_mask(
        BlockStridedPattern(block_size=b, stride_blocks=stride, num_local_blocks=local), S
    )


PATTERNS = [
    (
        SinkWindowPattern(block_size=4, num_sink_blocks=1, num_window_blocks=3),
        lambda S: brute_sink_window(S, 4, 1, 3),
    ),
    (
        SinkWindowPattern(block_size=3, num_sink_blocks=2, num_window_blocks=1),
        lambda S: brute_sink_window(S, 3, 2, 1),
    ),
    (
        BlockStridedPattern(block_size=4, stride_blocks=3, num_local_blocks=2),
        lambda S: brute_block_strided(S, 4, 3, 2),
    ),
    (
        BlockStridedPattern(block_size=5, stride_blocks=2, num_local_blocks=1),
        lambda S: brute_block_strided(S, 5, 2, 1),
    ),
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
    assert torch.equal(
        dense_sink_window_mask(40, block_size=4, num_sink_blocks=1, num_window_blocks=3),
        brute_sink_window(40, 4, 1, 3),
    )
    assert torch.equal(
        dense_block_strided_mask(40, block_size=4, stride_blocks=3, num_local_blocks=2),
        brute_block_strided(40, 4, 3, 2),
    )


# Hand-written block matrices (1 = the query block of the row sees the key block of the column), small
# enough to check against the paper by eye; the first two are the pictures in masks.py's docstring.
LITERAL_BLOCKS = {
    "sink_window_s1_w3": (
        SinkWindowPattern(block_size=4, num_sink_blocks=1, num_window_blocks=3),
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 0, 1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 1, 1, 0, 0],
            [1, 0, 0, 0, 1, 1, 1, 0],
            [1, 0, 0, 0, 0, 1, 1, 1],
        ],
    ),
    "block_strided_st3_l2": (
        BlockStridedPattern(block_size=4, stride_blocks=3, num_local_blocks=2),
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 0, 1, 1, 0, 0, 0, 0],
            [1, 0, 0, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 1, 1, 0, 0],
            [1, 0, 0, 1, 0, 1, 1, 0],
            [1, 0, 0, 1, 0, 0, 1, 1],
        ],
    ),
    "sink_window_s2_w2": (
        SinkWindowPattern(block_size=4, num_sink_blocks=2, num_window_blocks=2),
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 1, 1, 0],
            [1, 1, 0, 0, 0, 0, 1, 1],
        ],
    ),
    "block_strided_st2_l1": (
        BlockStridedPattern(block_size=4, stride_blocks=2, num_local_blocks=1),
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0, 0],
            [1, 0, 1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 1, 0, 0, 0],
            [1, 0, 1, 0, 1, 1, 0, 0],
            [1, 0, 1, 0, 1, 0, 1, 0],
            [1, 0, 1, 0, 1, 0, 1, 1],
        ],
    ),
}


@pytest.mark.parametrize("name", list(LITERAL_BLOCKS))
def test_block_rule_matches_hand_written_matrix(name):
    pattern, literal = LITERAL_BLOCKS[name]
    expected = torch.tensor(literal, dtype=torch.bool)
    assert torch.equal(block_mask_matrix(pattern, 8), expected)
    assert torch.equal(independent_block_mask(pattern, 8), expected)  # the tests' oracle agrees too
    table = kv_block_table(pattern, 8)
    assert [[int(x) for x in row if x >= 0] for row in table] == [
        [j for j, kept in enumerate(row) if kept] for row in literal
    ]
    # Token level on whole blocks: each kept block is all ones, except the causal diagonal block.
    b = pattern.block_size
    token = expected.repeat_interleave(b, 0).repeat_interleave(b, 1) & torch.ones(8 * b, 8 * b).bool().tril()
    assert torch.equal(pattern.dense_mask(8 * b), token)


# Token-level masks with a partial last block, written out in full (row = query, column = key).
LITERAL_TOKENS = {
    # blocks of 4 tokens: [0..3] [4..7] [8 9]; query block 2 sees the sink and itself, not block 1.
    "sink_window_b4_s1_w1_S10": (
        SinkWindowPattern(block_size=4, num_sink_blocks=1, num_window_blocks=1),
        [
            "1000000000",
            "1100000000",
            "1110000000",
            "1111000000",
            "1111100000",
            "1111110000",
            "1111111000",
            "1111111100",
            "1111000010",
            "1111000011",
        ],
    ),
    # blocks of 3 tokens: [0..2] [3..5] [6 7]; block 2 is on the stride (2), block 1 is not.
    "block_strided_b3_st2_l1_S8": (
        BlockStridedPattern(block_size=3, stride_blocks=2, num_local_blocks=1),
        [
            "10000000",
            "11000000",
            "11100000",
            "11110000",
            "11111000",
            "11111100",
            "11100010",
            "11100011",
        ],
    ),
}


@pytest.mark.parametrize("name", list(LITERAL_TOKENS))
def test_token_mask_with_partial_last_block_matches_hand_written(name):
    pattern, rows = LITERAL_TOKENS[name]
    S = len(rows)
    expected = torch.tensor([[c == "1" for c in row] for row in rows])
    assert torch.equal(pattern.dense_mask(S), expected)
    pos = torch.arange(S)
    assert torch.equal(pattern.mask_fn()(0, 0, pos[:, None], pos[None, :]), expected)
    assert torch.equal(independent_token_mask(pattern, S), expected)
    assert torch.equal(keys_per_query(pattern, S), expected.sum(dim=1))
