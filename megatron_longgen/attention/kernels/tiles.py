"""Tile tables: a pattern's block-level keep rule resampled to the (query tile, key tile) grid of a kernel.

Legend: S = sequence length, b = pattern block size, BM / BN = query / key tile sizes (tokens),
nQT / nKT = query / key tiles, W = kept key tiles per query tile (table width), R = BM // min(b, BM) row
and C = BN // min(b, BN) column sub-blocks of a tile (each lies inside one pattern block).

Everything here is block-level: the largest tensor is [nQT, nKT] int32 (8 MiB at 128K with 128x64 tiles),
never [S, S]. A tile entry is

- *full* when every query row of the tile keeps every key column: all its (row, column) sub-block
  pairs are kept, the key tile ends before the query tile starts (no token-level causal cut) and neither tile runs
  past the sequence end; kernels skip all masking there;
- *partial* otherwise (the diagonal, tiles that only some row sub-blocks keep, the ragged end); kernels
  rebuild the token mask from `bits` (bit r * C + c set = row sub-block r keeps column sub-block c),
  causality and the sequence length.

`classify_tiles` gives the Triton kernels both (bits and full); `tile_occupancy` gives FlexAttention the
same listed / full split for any keep matrix and positions (a CP rank's non-contiguous keys too), without
bits, so with no limit on the block pairs per tile.
"""

from __future__ import annotations

import math
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
    col_sub: int
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
    """ValueError unless each tile is whole pattern blocks or lies inside one, with at most 30 sub-blocks."""
    b = pattern.block_size
    for what, tile in (("query", block_m), ("key", block_n)):
        if tile % b and b % tile:
            raise ValueError(f"{what} tile {tile} and pattern block {b} must nest (one divides the other)")
    subs = (block_m // min(b, block_m)) * (block_n // min(b, block_n))
    if subs > 30:
        raise ValueError(f"tiles {block_m} x {block_n} span {subs} pattern-block pairs; at most 30 allowed")


def tile_bits(pattern: SparsePattern, seq_len: int, *, block_m: int, block_n: int, device) -> torch.Tensor:
    """[nQT, nKT] int32: bit (r * C + c) set when row sub-block r of query tile i keeps column sub-block c
    of key tile j (sub-blocks: min(b, tile) tokens; C = block_n // min(b, block_n)); 0 = tile skipped."""
    check_tiles(pattern, block_m=block_m, block_n=block_n)
    b = pattern.block_size
    row_sub, col_sub = min(b, block_m), min(b, block_n)
    n_cs = block_n // col_sub
    n_qt, n_kt = num_blocks(seq_len, block_m), num_blocks(seq_len, block_n)
    nb = num_blocks(seq_len, b)
    keep = block_mask_matrix(pattern, nb, nb, device=device)  # [nB, nB]
    bits = torch.zeros(n_qt, n_kt, dtype=torch.int32, device=device)
    for r in range(block_m // row_sub):
        row_start = torch.arange(n_qt, device=device) * block_m + r * row_sub
        row_ok = row_start < seq_len
        qb = (row_start // b).clamp(max=nb - 1)
        for c in range(n_cs):
            col_start = torch.arange(n_kt, device=device) * block_n + c * col_sub
            col_ok = col_start < seq_len
            kb = (col_start // b).clamp(max=nb - 1)
            kept = keep[qb][:, kb] & row_ok[:, None] & col_ok[None, :]
            bits |= kept.to(torch.int32) << (r * n_cs + c)
    return bits


def all_bits(pattern: SparsePattern, *, block_m: int, block_n: int) -> int:
    """The bits value of a tile whose every (row, column) sub-block pair is kept."""
    b = pattern.block_size
    return (1 << ((block_m // min(b, block_m)) * (block_n // min(b, block_n)))) - 1


def classify_tiles(
    pattern: SparsePattern, seq_len: int, *, block_m: int, block_n: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """([nQT, nKT] int32 `tile_bits`, [nQT, nKT] bool *full*): full = every sub-block pair kept, the key tile
    ends before the query tile starts, and neither runs past the sequence end (kernels skip masking)."""
    bits = tile_bits(pattern, seq_len, block_m=block_m, block_n=block_n, device=device)
    n_qt, n_kt = bits.shape
    all_rows = all_bits(pattern, block_m=block_m, block_n=block_n)
    q_start = torch.arange(n_qt, device=device)[:, None] * block_m
    k_end = (torch.arange(n_kt, device=device)[None, :] + 1) * block_n
    in_range = ((torch.arange(n_qt, device=device)[:, None] + 1) * block_m <= seq_len) & (k_end <= seq_len)
    return bits, (bits == all_rows) & (k_end <= q_start) & in_range


def _tile_extent(
    positions: torch.Tensor, tile: int, num_tiles: int, *, fill: int, lowest: bool
) -> torch.Tensor:
    """Per tile, the lowest (or highest) position; the tail past the last position counts as `fill`."""
    padded = positions.new_full((num_tiles * tile,), fill)
    padded[: positions.numel()] = positions
    view = padded.view(num_tiles, tile)
    return view.amin(dim=1) if lowest else view.amax(dim=1)


def tile_occupancy(
    keep_QK: torch.Tensor,
    *,
    block_size: int,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    tile: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(listed, full) [nQT, nKT] bool for any block keep matrix and token positions (the Flex form of
    `classify_tiles`, free of its 30-pair limit): listed = some block pair of the tile is kept; full = all
    are, and every key position of the tile lies below every query position of it (padding never does).

    `keep_QK` is [ceil(S/b), ceil(T/b)] over the query / key tensors' blocks; blocks and tiles are aligned
    on the grid u = gcd(b, BM, BN), so the work is ((S/u) x (T/u)) booleans, never [S, T].
    """
    device = keep_QK.device
    b, (bm, bn) = block_size, tile
    n_qt, n_kt = num_blocks(q_positions.numel(), bm), num_blocks(k_positions.numel(), bn)
    u = math.gcd(b, math.gcd(bm, bn))
    nqb, nkb = keep_QK.shape
    # Block index of every u-unit of the padded tile grid; units past the last block keep nothing.
    q_blk = torch.arange(n_qt * (bm // u), device=device) * u // b
    k_blk = torch.arange(n_kt * (bn // u), device=device) * u // b
    keep_u = keep_QK[q_blk.clamp(max=nqb - 1)][:, k_blk.clamp(max=nkb - 1)]
    keep_u &= (q_blk < nqb)[:, None] & (k_blk < nkb)[None, :]
    tiles = keep_u.view(n_qt, bm // u, n_kt, bn // u)
    q_pos, k_pos = q_positions.to(device), k_positions.to(device)
    never, always = torch.iinfo(torch.int64).max, -1  # padding: a query that sees nothing, an unseen key
    q_min = _tile_extent(q_pos, bm, n_qt, fill=always, lowest=True)
    q_max = _tile_extent(q_pos, bm, n_qt, fill=always, lowest=False)
    k_min = _tile_extent(k_pos, bn, n_kt, fill=never, lowest=True)
    k_max = _tile_extent(k_pos, bn, n_kt, fill=never, lowest=False)
    # A kept block pair may still be causally empty in a tile (a block straddling the tile edge).
    listed = tiles.any(dim=3).any(dim=1) & (k_min[None, :] <= q_max[:, None])
    full = tiles.all(dim=3).all(dim=1) & (k_max[None, :] < q_min[:, None])
    return listed, full


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
    bits, full = classify_tiles(pattern, seq_len, block_m=block_m, block_n=block_n, device=device)
    n_qt, n_kt = bits.shape
    kv_idx, kv_bits, kv_full, kv_cnt = _pack_rows(bits, full)
    if transposed:
        q_idx, q_bits, q_full, q_cnt = _pack_rows(bits.t().contiguous(), full.t().contiguous())
        q_order = q_cnt.argsort(descending=True, stable=True).to(torch.int32).contiguous()
    else:
        q_idx = q_bits = q_full = q_cnt = q_order = torch.empty(0, dtype=torch.int32, device=device)
    return TileTables(
        block_m=block_m,
        block_n=block_n,
        row_sub=min(pattern.block_size, block_m),
        col_sub=min(pattern.block_size, block_n),
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
