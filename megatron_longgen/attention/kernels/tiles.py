"""Tile tables: a pattern's block-level keep rule resampled to the (query tile, key tile) grid of a kernel.

Legend: S = sequence length, b = pattern block size, BM / BN = query / key tile sizes (tokens),
nQT / nKT = query / key tiles, W = kept key tiles per query tile (table width), R = BM // min(b, BM) row
sub-blocks of a query tile (each lies inside one pattern block).

Everything here is block-level: the largest tensor is [nQT, nKT] int32 (8 MiB at 128K with 128x64 tiles),
never [S, S]. A tile entry is

- *full* when every query row of the tile keeps every key column: all its row sub-blocks keep the key
  block, the key tile ends before the query tile starts (no token-level causal cut) and neither tile runs
  past the sequence end; kernels skip all masking there;
- *partial* otherwise (the diagonal, tiles that only some row sub-blocks keep, the ragged end); kernels
  rebuild the token mask from `bits` (bit r set = row sub-block r keeps this key tile), causality and the
  sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_longgen.attention.masks import SparsePattern, block_mask_matrix, num_blocks


@dataclass(frozen=True)
class TileTables:
    """Per-query-tile lists of key tiles (and the transposed lists), full entries first in each row.

    kv_idx [nQT, W] int32 key tiles (ascending within the full and within the partial part, padded with 0),
    kv_bits [nQT, W] int32 row-sub-block keep bits, kv_full [nQT] / kv_cnt [nQT] int32 counts;
    q_idx / q_bits / q_full / q_cnt: the same for key tiles over query tiles ([nKT, Wt]);
    q_order [nKT] int32: key tiles by decreasing work (backward programs launch the longest first).
    """

    block_m: int
    block_n: int
    row_sub: int
    num_q_tiles: int
    num_k_tiles: int
    kv_idx: torch.Tensor
    kv_bits: torch.Tensor
    kv_full: torch.Tensor
    kv_cnt: torch.Tensor
    q_idx: torch.Tensor
    q_bits: torch.Tensor
    q_full: torch.Tensor
    q_cnt: torch.Tensor
    q_order: torch.Tensor


def check_tiles(pattern: SparsePattern, *, block_m: int, block_n: int) -> None:
    """ValueError unless key tiles nest inside pattern blocks and query tiles are whole sub-blocks."""
    b = pattern.block_size
    if b % block_n:
        raise ValueError(f"key tile {block_n} must divide the pattern block size {b}")
    row_sub = min(b, block_m)
    if block_m % row_sub or b % row_sub:
        raise ValueError(f"query tile {block_m} and pattern block {b} must nest (one divides the other)")
    if block_m // row_sub > 30:
        raise ValueError(f"query tile {block_m} spans {block_m // row_sub} pattern blocks; at most 30 allowed")


def tile_bits(pattern: SparsePattern, seq_len: int, *, block_m: int, block_n: int, device) -> torch.Tensor:
    """[nQT, nKT] int32: bit r set when row sub-block r of query tile i keeps key tile j (0 = skipped)."""
    check_tiles(pattern, block_m=block_m, block_n=block_n)
    b = pattern.block_size
    row_sub = min(b, block_m)
    n_qt, n_kt = num_blocks(seq_len, block_m), num_blocks(seq_len, block_n)
    nb = num_blocks(seq_len, b)
    keep = block_mask_matrix(pattern, nb, nb, device=device)  # [nB, nB]
    kt_block = (torch.arange(n_kt, device=device) * block_n) // b  # pattern block of each key tile
    keep_k = keep[:, kt_block]  # [nB, nKT]
    bits = torch.zeros(n_qt, n_kt, dtype=torch.int32, device=device)
    for r in range(block_m // row_sub):
        row_start = torch.arange(n_qt, device=device) * block_m + r * row_sub
        valid = row_start < seq_len
        qb = (row_start // b).clamp(max=nb - 1)
        bits |= (keep_k[qb] & valid[:, None]).to(torch.int32) << r
    return bits


def _pack_rows(bits: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of a [R, C] bits matrix -> (idx [R, W], bits [R, W], num_full [R], num_kept [R]), full first."""
    cols = torch.arange(bits.shape[1], device=bits.device).expand_as(bits)
    kept = bits != 0
    # Sort key: full entries (by column), then partial ones (by column), then the dropped ones.
    key = torch.where(full, cols, torch.where(kept, cols + bits.shape[1], cols + 2 * bits.shape[1]))
    width = max(int(kept.sum(dim=1).max().item()) if kept.numel() else 0, 1)
    order = key.sort(dim=1).indices[:, :width]
    idx_kept = kept.gather(1, order)
    idx = torch.where(idx_kept, order, torch.zeros_like(order)).to(torch.int32).contiguous()
    row_bits = torch.where(idx_kept, bits.gather(1, order), torch.zeros_like(order, dtype=bits.dtype))
    return (
        idx,
        row_bits.to(torch.int32).contiguous(),
        full.sum(dim=1).to(torch.int32).contiguous(),
        kept.sum(dim=1).to(torch.int32).contiguous(),
    )


def build_tile_tables(
    pattern: SparsePattern, seq_len: int, *, block_m: int, block_n: int, device, transposed: bool = True
) -> TileTables:
    """The forward (query-major) and, if `transposed`, backward (key-major) tile tables."""
    bits = tile_bits(pattern, seq_len, block_m=block_m, block_n=block_n, device=device)
    n_qt, n_kt = bits.shape
    row_sub = min(pattern.block_size, block_m)
    all_rows = (1 << (block_m // row_sub)) - 1
    q_start = torch.arange(n_qt, device=device)[:, None] * block_m
    k_end = (torch.arange(n_kt, device=device)[None, :] + 1) * block_n
    in_range = ((torch.arange(n_qt, device=device)[:, None] + 1) * block_m <= seq_len) & (k_end <= seq_len)
    full = (bits == all_rows) & (k_end <= q_start) & in_range
    kv_idx, kv_bits, kv_full, kv_cnt = _pack_rows(bits, full)
    if transposed:
        q_idx, q_bits, q_full, q_cnt = _pack_rows(bits.t().contiguous(), full.t().contiguous())
        q_order = q_cnt.argsort(descending=True, stable=True).to(torch.int32).contiguous()
    else:
        q_idx = q_bits = q_full = q_cnt = q_order = torch.empty(0, dtype=torch.int32, device=device)
    return TileTables(
        block_m=block_m,
        block_n=block_n,
        row_sub=row_sub,
        num_q_tiles=n_qt,
        num_k_tiles=n_kt,
        kv_idx=kv_idx,
        kv_bits=kv_bits,
        kv_full=kv_full,
        kv_cnt=kv_cnt,
        q_idx=q_idx,
        q_bits=q_bits,
        q_full=q_full,
        q_cnt=q_cnt,
        q_order=q_order,
    )
