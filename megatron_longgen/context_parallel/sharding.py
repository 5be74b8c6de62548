"""Load-balanced (zig-zag) sequence sharding for context parallelism: pure index arithmetic.

Legend: S = global sequence length, R = CP world size (`cp_size`), r = CP rank, c = S / (2R) tokens per
chunk, b = sparse block size, B = batch.

The sequence is cut into 2R equal chunks; rank r holds chunks r and 2R-1-r, concatenated in that order::

    R = 2, S = 8 (c = 2):   chunk   0     1     2     3
                            tokens  0 1 | 2 3 | 4 5 | 6 7
                            rank    0     1     1     0        rank 0: [0 1 6 7], rank 1: [2 3 4 5]

Under causal attention every rank then does the same amount of work (an early chunk paired with a late
one). This is exactly the layout Megatron-Core's `get_pos_emb_on_this_cp_rank` assumes for RoPE and
`get_batch_on_this_cp_rank` produces, so RoPE sees each token's true global position. Every attention
layer type (ring attention for full layers, the KV-reduced exchange for sparse layers) and the data path
use the functions below; nothing else knows the layout.

A chunk must hold whole sparse blocks (c % b == 0) so that sparse blocks never straddle two ranks:
`check_cp_divisibility` enforces S % (2*R*b) == 0 with a message naming the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_cp_divisibility(*, seq_len: int, cp_size: int, block_size: int = 1) -> None:
    """Raise ValueError unless `seq_len` splits into 2*cp_size chunks of whole `block_size` blocks."""
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    unit = 2 * cp_size * block_size
    if seq_len % unit:
        raise ValueError(
            f"seq_len {seq_len} must be a multiple of 2·cp·block = 2·{cp_size}·{block_size} = {unit} "
            f"(2·cp zig-zag chunks of whole {block_size}-token blocks)"
        )


def check_cp_rank(*, cp_rank: int, cp_size: int) -> None:
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside [0, cp_size {cp_size})")


def zigzag_chunk_ids(*, cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunks rank `cp_rank` holds, in local order: (r, 2R-1-r)."""
    check_cp_rank(cp_rank=cp_rank, cp_size=cp_size)
    return cp_rank, 2 * cp_size - 1 - cp_rank


def chunk_owner(*, chunk: int, cp_size: int) -> int:
    """The CP rank holding global chunk `chunk` (0 <= chunk < 2R)."""
    if not 0 <= chunk < 2 * cp_size:
        raise ValueError(f"chunk {chunk} is outside [0, 2·cp {2 * cp_size})")
    return chunk if chunk < cp_size else 2 * cp_size - 1 - chunk


def chunk_len(*, seq_len: int, cp_size: int, block_size: int = 1) -> int:
    """Tokens per zig-zag chunk, c = S / (2R), after validating the divisibility."""
    check_cp_divisibility(seq_len=seq_len, cp_size=cp_size, block_size=block_size)
    return seq_len // (2 * cp_size)


def zigzag_positions(
    *, cp_rank: int, cp_size: int, seq_len: int, block_size: int = 1, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int64 [S/R]: the global positions of rank `cp_rank`'s tokens, in local order."""
    c = chunk_len(seq_len=seq_len, cp_size=cp_size, block_size=block_size)
    first, second = zigzag_chunk_ids(cp_rank=cp_rank, cp_size=cp_size)
    ar = torch.arange(c, device=device)
    return torch.cat([first * c + ar, second * c + ar])


def rank_block_ids(
    *, cp_rank: int, cp_size: int, seq_len: int, block_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int64 [S/(R*b)]: the global sparse-block indices of rank `cp_rank`'s blocks, in local order."""
    pos = zigzag_positions(
        cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len, block_size=block_size, device=device
    )
    return pos[::block_size] // block_size


def block_owner(*, block: torch.Tensor, cp_size: int, seq_len: int, block_size: int) -> torch.Tensor:
    """For global block indices `block` (int64, any shape): (owning rank, index among its local blocks)."""
    c = chunk_len(seq_len=seq_len, cp_size=cp_size, block_size=block_size)
    blocks_per_chunk = c // block_size
    chunk = block // blocks_per_chunk
    first_half = chunk < cp_size
    owner = torch.where(first_half, chunk, 2 * cp_size - 1 - chunk)
    local = block % blocks_per_chunk + torch.where(first_half, 0, blocks_per_chunk)
    return owner, local


def shard_sequence(
    x: torch.Tensor, *, cp_rank: int, cp_size: int, seq_dim: int, block_size: int = 1
) -> torch.Tensor:
    """Rank `cp_rank`'s zig-zag shard of `x` along `seq_dim` (a new tensor; autograd flows through)."""
    seq_len = x.shape[seq_dim]
    c = chunk_len(seq_len=seq_len, cp_size=cp_size, block_size=block_size)
    first, second = zigzag_chunk_ids(cp_rank=cp_rank, cp_size=cp_size)
    return torch.cat([x.narrow(seq_dim, first * c, c), x.narrow(seq_dim, second * c, c)], dim=seq_dim)


def unshard_sequence(shards: list[torch.Tensor], *, seq_dim: int) -> torch.Tensor:
    """Inverse of `shard_sequence`: the per-rank shards (index = rank) back to the global order."""
    cp_size = len(shards)
    if cp_size == 0:
        raise ValueError("unshard_sequence needs at least one shard")
    local = shards[0].shape[seq_dim]
    if local % 2 or any(s.shape[seq_dim] != local for s in shards):
        raise ValueError(
            f"shards must share an even length along dim {seq_dim}, got {[s.shape[seq_dim] for s in shards]}"
        )
    c = local // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, s in enumerate(shards):
        first, second = zigzag_chunk_ids(cp_rank=rank, cp_size=cp_size)
        chunks[first], chunks[second] = s.narrow(seq_dim, 0, c), s.narrow(seq_dim, c, c)
    return torch.cat(chunks, dim=seq_dim)


CP_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""Per-token batch entries `shard_batch_for_cp` splits by default (Megatron's GPT batch names)."""


def shard_batch_for_cp(
    batch: Mapping[str, torch.Tensor | None],
    *,
    cp_rank: int,
    cp_size: int,
    seq_dim: int = 1,
    block_size: int = 1,
    keys: tuple[str, ...] = CP_BATCH_KEYS,
) -> dict[str, torch.Tensor | None]:
    """This CP rank's part of a batch: every entry named in `keys` is zig-zag sharded along `seq_dim`.

    Entries not named in `keys` are passed through unchanged, except `attention_mask`, which must be None
    (LongGen layers are causal by construction; a dense [S, S] mask has no meaning per shard). With
    cp_size 1 the batch is returned as a shallow copy. Pass the model's sparse `block_size` so a length
    that would split a sparse block is refused here, before any layer runs.

    Raises ValueError when the named entries disagree on the sequence length or it does not divide.
    """
    check_cp_rank(cp_rank=cp_rank, cp_size=cp_size)
    if batch.get("attention_mask") is not None:
        raise ValueError("shard_batch_for_cp: attention_mask must be None (causal masking is implicit)")
    lengths = {k: batch[k].shape[seq_dim] for k in keys if batch.get(k) is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"batch entries disagree on the length of dim {seq_dim}: {lengths}")
    out = dict(batch)
    if cp_size == 1:
        return out
    for k in lengths:
        out[k] = shard_sequence(
            batch[k], cp_rank=cp_rank, cp_size=cp_size, seq_dim=seq_dim, block_size=block_size
        )
    return out
