"""Zig-zag sharding and the sparse exchange plan: pure index arithmetic, no process group."""

from __future__ import annotations

import pytest
import torch

from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern
from megatron_longgen.context_parallel.exchange_plan import plan_sparse_exchange
from megatron_longgen.context_parallel.sharding import (
    block_owner,
    check_cp_divisibility,
    rank_block_ids,
    shard_batch_for_cp,
    shard_sequence,
    unshard_sequence,
    zigzag_chunk_ids,
    zigzag_positions,
)


def test_positions_cp2_literal():
    assert zigzag_positions(cp_rank=0, cp_size=2, seq_len=8).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(cp_rank=1, cp_size=2, seq_len=8).tolist() == [2, 3, 4, 5]


def test_positions_cp4_literal():
    expected = {
        0: [0, 1, 14, 15],
        1: [2, 3, 12, 13],
        2: [4, 5, 10, 11],
        3: [6, 7, 8, 9],
    }
    for rank, pos in expected.items():
        assert zigzag_positions(cp_rank=rank, cp_size=4, seq_len=16).tolist() == pos
    assert [zigzag_chunk_ids(cp_rank=r, cp_size=4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]


def test_block_ids_and_owner_cp4():
    # S = 32, b = 2: 16 blocks, chunks of 2 blocks.
    assert rank_block_ids(cp_rank=1, cp_size=4, seq_len=32, block_size=2).tolist() == [2, 3, 12, 13]
    owner, local = block_owner(block=torch.arange(16), cp_size=4, seq_len=32, block_size=2)
    assert owner.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 2, 2, 1, 1, 0, 0]
    assert local.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_shard_unshard_round_trip(cp_size):
    x = torch.arange(2 * 3 * 32).view(2, 32, 3)
    shards = [shard_sequence(x, cp_rank=r, cp_size=cp_size, seq_dim=1) for r in range(cp_size)]
    for r, s in enumerate(shards):
        assert (
            s[0, :, 0].div(3, rounding_mode="floor").tolist()
            == zigzag_positions(cp_rank=r, cp_size=cp_size, seq_len=32).tolist()
        )
    assert torch.equal(unshard_sequence(shards, seq_dim=1), x)


def test_shard_batch_for_cp():
    batch = {
        "tokens": torch.arange(16).view(2, 8),
        "labels": torch.arange(16).view(2, 8) + 100,
        "loss_mask": torch.ones(2, 8),
        "position_ids": torch.arange(8).expand(2, 8),
        "attention_mask": None,
        "extra": "kept",
    }
    out = shard_batch_for_cp(batch, cp_rank=1, cp_size=2)
    assert out["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert out["labels"].tolist() == [[102, 103, 104, 105], [110, 111, 112, 113]]
    assert out["position_ids"].tolist() == [[2, 3, 4, 5]] * 2
    assert out["loss_mask"].shape == (2, 4) and out["extra"] == "kept" and out["attention_mask"] is None


def test_divisibility_errors():
    with pytest.raises(ValueError, match=r"seq_len 131000 must be a multiple of 2·cp·block = 2·8·64 = 1024"):
        check_cp_divisibility(seq_len=131000, cp_size=8, block_size=64)
    check_cp_divisibility(seq_len=131072, cp_size=8, block_size=64)
    # CP larger than the number of chunks the sequence can form.
    with pytest.raises(ValueError, match=r"seq_len 4 must be a multiple of 2·cp·block = 2·4·1 = 8"):
        zigzag_positions(cp_rank=0, cp_size=4, seq_len=4)
    with pytest.raises(ValueError, match=r"cp_rank 2 is outside \[0, cp_size 2\)"):
        zigzag_positions(cp_rank=2, cp_size=2, seq_len=8)
    with pytest.raises(ValueError, match=r"seq_len 24 must be a multiple of 2·cp·block = 2·2·8 = 32"):
        shard_batch_for_cp({"tokens": torch.zeros(1, 24)}, cp_rank=0, cp_size=2, block_size=8)
    with pytest.raises(ValueError, match="disagree on the length"):
        shard_batch_for_cp({"tokens": torch.zeros(1, 8), "labels": torch.zeros(1, 6)}, cp_rank=0, cp_size=2)
    with pytest.raises(ValueError, match="attention_mask must be None"):
        shard_batch_for_cp(
            {"tokens": torch.zeros(1, 8), "attention_mask": torch.ones(1, 1, 8, 8)}, cp_rank=0, cp_size=2
        )
    with pytest.raises(ValueError, match="must be a multiple of 2·cp·block = 2·2·64 = 256"):
        plan_sparse_exchange(SinkWindowPattern(), cp_rank=0, cp_size=2, seq_len=1000)


def test_sink_window_plan_128k_cp2():
    """The numbers quoted in exchange_plan.py: 31 and 32 blocks fetched at 128K, CP=2."""
    pattern = SinkWindowPattern(block_size=64, num_sink_blocks=1, num_window_blocks=32)
    p0 = plan_sparse_exchange(pattern, cp_rank=0, cp_size=2, seq_len=131072)
    p1 = plan_sparse_exchange(pattern, cp_rank=1, cp_size=2, seq_len=131072)
    assert p0.num_fetched_blocks == 31 and p1.num_fetched_blocks == 32
    # Rank 0 receives rank 1's last 31 blocks of chunk 2 (rank 1 local blocks 993..1023).
    assert p0.recv_blocks[1].tolist() == list(range(993, 1024))
    # Rank 1 receives the sink block and the 31 blocks before chunk 1 (rank 0 local 0 and 481..511).
    assert p1.recv_blocks[0].tolist() == [0] + list(range(481, 512))
    assert torch.equal(p0.send_blocks[1], p1.recv_blocks[0]) and torch.equal(
        p1.send_blocks[0], p0.recv_blocks[1]
    )
    allgather_blocks = 131072 // 2 // 64
    assert p1.num_fetched_blocks / allgather_blocks < 0.05


def test_plan_table_matches_pattern():
    """Every (query block, key block) pair of the pattern appears exactly once in some rank's table."""
    pattern = BlockStridedPattern(block_size=4, stride_blocks=3, num_local_blocks=2)
    seq_len, cp_size, b = 64, 4, 4
    seen = torch.zeros(seq_len // b, seq_len // b, dtype=torch.int64)
    for r in range(cp_size):
        plan = plan_sparse_exchange(pattern, cp_rank=r, cp_size=cp_size, seq_len=seq_len)
        key_block = plan.k_positions[::b] // b
        for i, qb in enumerate(
            rank_block_ids(cp_rank=r, cp_size=cp_size, seq_len=seq_len, block_size=b).tolist()
        ):
            for kidx in plan.kv_table[i].tolist():
                if kidx >= 0:
                    seen[qb, key_block[kidx]] += 1
    qb = torch.arange(seq_len // b)[:, None]
    kb = torch.arange(seq_len // b)[None, :]
    assert torch.equal(seen, pattern.block_rule(qb, kb).long())
