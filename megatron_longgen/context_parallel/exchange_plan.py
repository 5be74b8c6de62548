"""Which key/value blocks a CP rank needs for a sparse layer: pure index maths, no process group.

Legend: S = global sequence, R = CP world size, r = rank in the CP group, b = sparse block size,
nB = S/b global blocks, L = local blocks (S/(R*b)), F = fetched (remote) blocks, T = L*b + F*b keys
after the exchange, W = kept key blocks per local query block (table width).

With the zig-zag layout (`sharding.py`) a rank's queries see

    sink_window:    the sink block(s) + the (num_window_blocks - 1) blocks before each of its two chunks
    block_strided:  every stride_blocks-th block before its chunks + (num_local_blocks - 1) halo blocks

and only the blocks of those that another rank owns must move. Which blocks rank p needs from rank q is a
pure function of (pattern, R, S), so both sides compute the same plan (`plan_sparse_exchange`) and no
metadata is exchanged. Example, sink_window b=64 with 32 window blocks, S = 128K, R = 2: rank 0 fetches
31 blocks (1,984 tokens), rank 1 fetches 32 (2,048), against 65,536 tokens for an all-gather of K/V.

The plan also lays out the keys after the exchange ([local blocks | fetched blocks, grouped by peer]) and
gives, per local query block, the kept key blocks in that layout (`kv_table`) and every token's global
position (the causal rule across ranks). `sparse_exchange.py` moves the blocks and runs the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from megatron_longgen.attention.masks import SparsePattern, mask_matrix_to_table
from megatron_longgen.context_parallel.sharding import block_owner, check_cp_divisibility, rank_block_ids


@dataclass(frozen=True, kw_only=True)
class SparseExchangePlan:
    """Everything rank `cp_rank` needs to run one sparse layer under CP (CPU int64 tensors)."""

    cp_rank: int
    cp_size: int
    seq_len: int
    block_size: int
    recv_blocks: dict[int, torch.Tensor] = field(repr=False)
    """peer -> the peer's local block indices this rank receives, in key order."""
    send_blocks: dict[int, torch.Tensor] = field(repr=False)
    """peer -> this rank's local block indices the peer needs, in the peer's key order."""
    q_positions: torch.Tensor = field(repr=False)
    """[L*b] global positions of the local tokens."""
    k_positions: torch.Tensor = field(repr=False)
    """[T] global positions of [local | fetched] keys."""
    kv_table: torch.Tensor = field(repr=False)
    """[L, W] per local query block, indices of kept key blocks in [local | fetched] (-1 padded)."""

    @property
    def num_fetched_blocks(self) -> int:
        return sum(int(v.numel()) for v in self.recv_blocks.values())

    @property
    def num_sent_blocks(self) -> int:
        return sum(int(v.numel()) for v in self.send_blocks.values())

    def keep_matrix(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[L, L + F] bool: local query block i keeps key block j of the [local | fetched] layout."""
        n_kb = self.k_positions.numel() // self.block_size
        table = self.kv_table.to(device)
        keep = torch.zeros(table.shape[0], n_kb + 1, dtype=torch.bool, device=device)
        rows = torch.arange(table.shape[0], device=device)[:, None].expand_as(table)
        keep[rows, torch.where(table >= 0, table, n_kb)] = True  # -1 padding lands in a spare column
        return keep[:, :n_kb].contiguous()

    def forward_bytes(self, *, batch: int, kv_heads: int, head_dim: int, element_size: int) -> dict[str, int]:
        """Bytes this rank sends and receives in the forward (K and V); the backward moves the same
        amounts the other way (dK/dV in the gradients' dtype)."""
        per_block = 2 * batch * kv_heads * self.block_size * head_dim * element_size
        return {"sent": self.num_sent_blocks * per_block, "received": self.num_fetched_blocks * per_block}


def _needed_blocks(
    pattern: SparsePattern, *, cp_rank: int, cp_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [L, nB] block mask of this rank's query blocks, sorted global ids of all needed key blocks)."""
    b = pattern.block_size
    q_blocks = rank_block_ids(cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len, block_size=b)
    keep = pattern.block_rule(q_blocks[:, None], torch.arange(seq_len // b)[None, :])
    return keep, keep.any(dim=0).nonzero().flatten()


def _remote_by_owner(needed: torch.Tensor, *, cp_rank: int, cp_size: int, seq_len: int, block_size: int):
    owner, local = block_owner(block=needed, cp_size=cp_size, seq_len=seq_len, block_size=block_size)
    return {p: (needed[owner == p], local[owner == p]) for p in range(cp_size) if p != cp_rank}


@lru_cache(maxsize=64)
def plan_sparse_exchange(
    pattern: SparsePattern, *, cp_rank: int, cp_size: int, seq_len: int
) -> SparseExchangePlan:
    """The exchange and key layout for `pattern` on rank `cp_rank` of `cp_size` (pure, cached).

    Raises ValueError when `seq_len` is not a multiple of 2*cp_size*block_size.
    """
    b = pattern.block_size
    check_cp_divisibility(seq_len=seq_len, cp_size=cp_size, block_size=b)
    keep, needed = _needed_blocks(pattern, cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len)
    mine = _remote_by_owner(needed, cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len, block_size=b)
    local_ids = rank_block_ids(cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len, block_size=b)
    # Key layout: this rank's blocks in local order, then the fetched blocks grouped by peer (ascending).
    key_index = torch.full((seq_len // b,), -1, dtype=torch.int64)
    key_index[local_ids] = torch.arange(local_ids.numel())
    fetched_ids = [mine[p][0] for p in sorted(mine)]
    all_fetched = torch.cat(fetched_ids) if fetched_ids else torch.empty(0, dtype=torch.int64)
    key_index[all_fetched] = local_ids.numel() + torch.arange(all_fetched.numel())
    key_blocks = torch.cat([local_ids, all_fetched])
    table_global = mask_matrix_to_table(keep)
    table = torch.where(
        table_global >= 0, key_index[table_global.clamp(min=0)], torch.full_like(table_global, -1)
    )
    assert bool(((table >= 0) == (table_global >= 0)).all()), "a kept key block was neither local nor fetched"
    send = {}
    for peer in range(cp_size):
        if peer == cp_rank:
            continue
        _, peer_needed = _needed_blocks(pattern, cp_rank=peer, cp_size=cp_size, seq_len=seq_len)
        theirs = _remote_by_owner(peer_needed, cp_rank=peer, cp_size=cp_size, seq_len=seq_len, block_size=b)
        send[peer] = theirs[cp_rank][1]
    ar = torch.arange(b)
    return SparseExchangePlan(
        cp_rank=cp_rank,
        cp_size=cp_size,
        seq_len=seq_len,
        block_size=b,
        recv_blocks={p: mine[p][1] for p in sorted(mine)},
        send_blocks=send,
        q_positions=(local_ids[:, None] * b + ar).flatten(),
        k_positions=(key_blocks[:, None] * b + ar).flatten(),
        kv_table=table,
    )
