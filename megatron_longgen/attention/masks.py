"""LongGen's static sparse attention patterns, at block level and token level.

Legend: S = sequence length, b = block size (tokens), qb / kb = query / key block index, nB = ceil(S / b).

Both patterns are block-aligned: whether query block `qb` may see key block `kb` depends on the block
indices alone; inside the kept blocks the usual token-level causal rule applies (key position <= query
position), which only bites on the diagonal block. Lengths that are not multiples of `b` are handled: the
last block is simply shorter.

Sink + window (`SinkWindowPattern`, the paper's AttnSink; 1 sink block, 32 window blocks of 64 tokens)::

    kb:   0 1 2 3 4 5 6 7          num_sink_blocks = 1, num_window_blocks = 3
    qb 0  \\                       \\ = diagonal block (token-level causal)
    qb 1  # \\                     # = kept block
    qb 2  # # \\
    qb 3  # # # \\
    qb 4  # . # # \\               . = skipped block
    qb 5  # . . # # \\
    qb 6  # . . . # # \\
    qb 7  # . . . . # # \\

Block-strided (`BlockStridedPattern`, the paper's BlockSparse; stride 64 blocks, block 0 on the stride)::

    kb:   0 1 2 3 4 5 6 7          stride_blocks = 3, num_local_blocks = 2
    qb 0  \\
    qb 1  # \\
    qb 2  # # \\
    qb 3  # . # \\                 kb 0 and 3 are on the stride
    qb 4  # . . # \\
    qb 5  # . . # # \\
    qb 6  # . . # . # \\
    qb 7  # . . # . . # \\

Each pattern offers:
- `block_rule(qb, kb)`: the block-level keep rule on broadcastable index tensors (causal included);
- `mask_fn()`: a token-level `(b, h, q_idx, kv_idx) -> bool` function (FlexAttention's mask_mod form),
  named `sink_window_b64_s1_w32` etc.;
- `dense_mask(S)`: the explicit [S, S] boolean mask, for tests and the oracle only (N^2 memory).
`kv_block_table` turns a pattern into the padded per-query-block list of key blocks that block-sparse
kernels iterate over (block-level memory only: nB^2 booleans, 4 MiB at 128K with 64-token blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_longgen.config import SparseAttentionConfig

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def num_blocks(seq_len: int, block_size: int) -> int:
    """Blocks covering `seq_len` tokens (the last one may be partial)."""
    return -(-seq_len // block_size)


@dataclass(frozen=True, kw_only=True)
class SinkWindowPattern:
    """Sink + sliding window, block aligned: query block qb keeps key blocks
    `kb < num_sink_blocks` and `qb - num_window_blocks < kb <= qb`."""

    block_size: int = 64
    num_sink_blocks: int = 1
    num_window_blocks: int = 32

    name = "sink_window"

    def block_rule(self, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        causal = kb <= qb
        return causal & ((kb < self.num_sink_blocks) | (qb - kb < self.num_window_blocks))

    def max_kv_blocks(self, num_kv_blocks: int) -> int:
        """Upper bound on kept key blocks per query block."""
        return min(num_kv_blocks, self.num_sink_blocks + self.num_window_blocks)

    def mask_fn(self) -> MaskFn:
        return make_sink_window_mask(
            block_size=self.block_size,
            num_sink_blocks=self.num_sink_blocks,
            num_window_blocks=self.num_window_blocks,
        )

    def dense_mask(self, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return dense_mask_from_rule(self, seq_len, device=device)


@dataclass(frozen=True, kw_only=True)
class BlockStridedPattern:
    """Local blocks + every `stride_blocks`-th block: query block qb keeps key blocks
    `qb - num_local_blocks < kb <= qb` and `kb <= qb with kb % stride_blocks == 0` (block 0 = sink)."""

    block_size: int = 64
    stride_blocks: int = 64
    num_local_blocks: int = 1

    name = "block_strided"

    def block_rule(self, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        causal = kb <= qb
        return causal & ((qb - kb < self.num_local_blocks) | (kb % self.stride_blocks == 0))

    def max_kv_blocks(self, num_kv_blocks: int) -> int:
        return min(num_kv_blocks, self.num_local_blocks + num_blocks(num_kv_blocks, self.stride_blocks))

    def mask_fn(self) -> MaskFn:
        return make_block_strided_mask(
            block_size=self.block_size,
            stride_blocks=self.stride_blocks,
            num_local_blocks=self.num_local_blocks,
        )

    def dense_mask(self, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return dense_mask_from_rule(self, seq_len, device=device)


SparsePattern = SinkWindowPattern | BlockStridedPattern


def pattern_from_config(cfg: SparseAttentionConfig) -> SparsePattern:
    """The pattern object a `SparseAttentionConfig` describes."""
    if cfg.variant == "sink_window":
        return SinkWindowPattern(
            block_size=cfg.block_size,
            num_sink_blocks=cfg.num_sink_blocks,
            num_window_blocks=cfg.num_window_blocks,
        )
    if cfg.variant == "block_strided":
        return BlockStridedPattern(
            block_size=cfg.block_size, stride_blocks=cfg.stride_blocks, num_local_blocks=cfg.num_local_blocks
        )
    raise ValueError(f"unknown sparse variant {cfg.variant!r}")


def token_mask_fn(pattern: SparsePattern, name: str) -> MaskFn:
    """The pattern's token-level mask function (FlexAttention's `mask_mod` signature), called `name`:
    key visible when its block is kept and it is not after the query."""
    b = pattern.block_size

    def mask(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & pattern.block_rule(q_idx // b, kv_idx // b)

    mask.__name__ = name
    return mask


def make_sink_window_mask(*, block_size: int, num_sink_blocks: int, num_window_blocks: int) -> MaskFn:
    """Token-level mask function (FlexAttention `mask_mod` signature) for the sink + window pattern."""
    return token_mask_fn(
        SinkWindowPattern(
            block_size=block_size, num_sink_blocks=num_sink_blocks, num_window_blocks=num_window_blocks
        ),
        f"sink_window_b{block_size}_s{num_sink_blocks}_w{num_window_blocks}",
    )


def make_block_strided_mask(*, block_size: int, stride_blocks: int, num_local_blocks: int) -> MaskFn:
    """Token-level mask function (FlexAttention `mask_mod` signature) for the block-strided pattern."""
    return token_mask_fn(
        BlockStridedPattern(
            block_size=block_size, stride_blocks=stride_blocks, num_local_blocks=num_local_blocks
        ),
        f"block_strided_b{block_size}_st{stride_blocks}_l{num_local_blocks}",
    )


def dense_causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[S, S] lower-triangular boolean mask (True = attend)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def dense_mask_from_rule(
    pattern: SparsePattern, seq_len: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[S, S] boolean token mask of a pattern. N^2 memory: tests, the oracle and visualisation only."""
    pos = torch.arange(seq_len, device=device)
    q, k = pos[:, None], pos[None, :]
    return (k <= q) & pattern.block_rule(q // pattern.block_size, k // pattern.block_size)


def dense_sink_window_mask(
    seq_len: int, *, block_size: int = 64, num_sink_blocks: int = 1, num_window_blocks: int = 32
) -> torch.Tensor:
    """[S, S] boolean mask of the sink + window pattern."""
    return SinkWindowPattern(
        block_size=block_size, num_sink_blocks=num_sink_blocks, num_window_blocks=num_window_blocks
    ).dense_mask(seq_len)


def dense_block_strided_mask(
    seq_len: int, *, block_size: int = 64, stride_blocks: int = 64, num_local_blocks: int = 1
) -> torch.Tensor:
    """[S, S] boolean mask of the block-strided pattern."""
    return BlockStridedPattern(
        block_size=block_size, stride_blocks=stride_blocks, num_local_blocks=num_local_blocks
    ).dense_mask(seq_len)


def block_mask_matrix(
    pattern: SparsePattern,
    num_q_blocks: int,
    num_kv_blocks: int | None = None,
    *,
    q_block_offset: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[nQB, nKB] booleans: does query block `q_block_offset + i` keep key block `j`."""
    num_kv_blocks = num_q_blocks + q_block_offset if num_kv_blocks is None else num_kv_blocks
    qb = torch.arange(q_block_offset, q_block_offset + num_q_blocks, device=device)[:, None]
    kb = torch.arange(num_kv_blocks, device=device)[None, :]
    return pattern.block_rule(qb, kb)


def kv_block_table(
    pattern: SparsePattern,
    num_q_blocks: int,
    num_kv_blocks: int | None = None,
    *,
    q_block_offset: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per query block, the kept key blocks in increasing order, padded with -1.

    Returns an int64 tensor [nQB, W] with W = the largest count over the rows. Row i belongs to query
    block `q_block_offset + i`; entries index key blocks 0..num_kv_blocks-1.
    """
    keep = block_mask_matrix(
        pattern, num_q_blocks, num_kv_blocks, q_block_offset=q_block_offset, device=device
    )
    return mask_matrix_to_table(keep)


def mask_matrix_to_table(keep: torch.Tensor) -> torch.Tensor:
    """[nQB, nKB] booleans -> [nQB, W] sorted kept column indices padded with -1."""
    width = max(int(keep.sum(dim=1).max().item()) if keep.numel() else 0, 1)
    cols = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    # Kept columns sort first (key 0), in index order; dropped ones are pushed past them.
    key = torch.where(keep, cols, cols + keep.shape[1])
    order = key.sort(dim=1).values[:, :width]
    return torch.where(order < keep.shape[1], order, torch.full_like(order, -1))


def keys_per_query(pattern: SparsePattern, seq_len: int) -> torch.Tensor:
    """[S] number of keys each query attends to (for FLOP accounting; O(nB^2) work, no N^2 memory)."""
    nb = num_blocks(seq_len, pattern.block_size)
    keep = block_mask_matrix(pattern, nb)  # [nB, nB]
    block_len = torch.full((nb,), pattern.block_size, dtype=torch.int64)
    block_len[-1] = seq_len - (nb - 1) * pattern.block_size
    off_diag = (keep.long().tril(-1) * block_len[None, :]).sum(dim=1)  # full blocks strictly before
    pos = torch.arange(seq_len)
    within = pos % pattern.block_size + 1  # causal part of the diagonal block
    return off_diag[pos // pattern.block_size] + within


def attended_pairs(pattern: SparsePattern | None, seq_len: int) -> int:
    """Number of (query, key) pairs computed: causal S(S+1)/2 for full attention (pattern None)."""
    if pattern is None:
        return seq_len * (seq_len + 1) // 2
    return int(keys_per_query(pattern, seq_len).sum().item())
