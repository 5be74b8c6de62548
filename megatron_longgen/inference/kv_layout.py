"""Which past tokens a layer keeps in its KV cache, and in which slot: pure index arithmetic.

Legend: b = block size (tokens), kb = key block index, qF = block of the next query, W = window blocks,
n = sink blocks, L = local blocks, st = stride (blocks), C = slots of one layer's cache.

A token's *position* is its index in the document (RoPE uses it unchanged: no re-indexing), and the keep
rule is the training mask's (`attention/masks.py`): once `length` tokens exist, every future query is at a
position >= `length`, in a block >= qF = length // b, so a layer needs only the keys that query block qF
keeps. Keys the next query drops are never seen again (the window only moves forward), so they are
evicted. The slot layouts below hold exactly those keys, each at a slot computed from its position:

    full           [ 0 1 2 3 4 ... ]                     slot = position
    sink_window    [ sink blocks | ring of W blocks ]    ring slot of block kb: (kb - n) mod W
    block_strided  [ ring of L blocks | strided blocks ] ring slot: kb mod L; stride slot: kb // st

Every layout is prefix-stable: a buffer of C slots can grow to C' > C by copying its C slots to the
front of the bigger one (sink_window's first n + W blocks sit at slot = position; block_strided appends
stride blocks at the end). A ring slot is reused only when the block it holds can no longer be seen:
blocks kb and kb + W (resp. kb + L) are never both in one query's window. At the moment a new block
starts, its ring region still holds the tail of the evicted block; the cache tracks each slot's position,
and the keep rule (`keep_mask`) excludes the stale ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern, SparsePattern, num_blocks

KV_POLICIES = ("model", "full", "sink_window", "block_strided")
"""Per-layer attention + cache choices: as trained, all full, or one sparse pattern on every layer."""


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class FullLayout:
    """Full attention: every token is kept, at slot = position."""

    name = "full"
    pattern = None

    def capacity(self, max_len: int) -> int:
        return max_len

    def slot_of(self, pos):
        return pos

    def kept_positions(self, length: int) -> torch.Tensor:
        return torch.arange(length)


@dataclass(frozen=True)
class SinkWindowLayout:
    """`num_sink_blocks` first blocks + a ring of the `num_window_blocks` most recent ones."""

    pattern: SinkWindowPattern

    name = "sink_window"

    @property
    def max_slots(self) -> int:
        p = self.pattern
        return (p.num_sink_blocks + p.num_window_blocks) * p.block_size

    def capacity(self, max_len: int) -> int:
        return min(self.max_slots, _round_up(max(max_len, 1), self.pattern.block_size))

    def slot_of(self, pos):
        p = self.pattern
        b, n = p.block_size, p.num_sink_blocks
        kb = pos // b
        ring = n * b + ((kb - n) % p.num_window_blocks) * b + pos % b
        if isinstance(pos, torch.Tensor):
            return torch.where(kb < n, pos, ring)
        return pos if kb < n else ring

    def kept_positions(self, length: int) -> torch.Tensor:
        p = self.pattern
        b = p.block_size
        sink_end = min(length, p.num_sink_blocks * b)
        window_start = max(p.num_sink_blocks, length // b - p.num_window_blocks + 1) * b
        window = torch.arange(min(max(window_start, sink_end), length), length)
        return torch.cat([torch.arange(sink_end), window])


@dataclass(frozen=True)
class BlockStridedLayout:
    """A ring of the `num_local_blocks` most recent blocks + every `stride_blocks`-th block (block 0 first)."""

    pattern: BlockStridedPattern

    name = "block_strided"

    def capacity(self, max_len: int) -> int:
        p = self.pattern
        stride_blocks = num_blocks(num_blocks(max(max_len, 1), p.block_size), p.stride_blocks)
        return (p.num_local_blocks + stride_blocks) * p.block_size

    def slot_of(self, pos):
        p = self.pattern
        b, local = p.block_size, p.num_local_blocks
        kb = pos // b
        strided = (local + kb // p.stride_blocks) * b + pos % b
        ring = (kb % local) * b + pos % b
        if isinstance(pos, torch.Tensor):
            return torch.where(kb % p.stride_blocks == 0, strided, ring)
        return strided if kb % p.stride_blocks == 0 else ring

    def kept_positions(self, length: int) -> torch.Tensor:
        p = self.pattern
        b = p.block_size
        pos = torch.arange(length)
        kb = pos // b
        local = kb > length // b - p.num_local_blocks
        return pos[(kb % p.stride_blocks == 0) | local]


KVLayout = FullLayout | SinkWindowLayout | BlockStridedLayout


def layout_for(pattern: SparsePattern | None) -> KVLayout:
    """The cache layout of a layer with this pattern (None = full attention)."""
    if pattern is None:
        return FullLayout()
    if isinstance(pattern, SinkWindowPattern):
        return SinkWindowLayout(pattern)
    if isinstance(pattern, BlockStridedPattern):
        return BlockStridedLayout(pattern)
    raise TypeError(f"no KV layout for pattern {pattern!r}")


def keep_mask(pattern: SparsePattern | None, *, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Booleans, broadcast of `q_pos` against `k_pos`: may a query at q_pos see the key at k_pos.

    Positions < 0 mark empty slots or padding keys (never visible). This is the training mask's rule
    (token-level causality plus the pattern's block rule) evaluated on stored positions.
    """
    visible = (k_pos >= 0) & (k_pos <= q_pos)
    if pattern is None:
        return visible
    b = pattern.block_size
    return visible & pattern.block_rule(q_pos // b, k_pos.clamp(min=0) // b)
