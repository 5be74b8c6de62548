"""Token masks written from the paper's definitions with plain Python loops, for the kernel oracles.

Legend: S = sequence length, b = block size, qb / kb = query / key block.

The kernels derive their tile tables, block tables and Flex block masks from `SparsePattern.block_rule`;
if every oracle mask came from that rule too, a wrong rule would pass every kernel test. These masks read
only the pattern's *numbers* (block size, sink / window / stride / local counts) and build the set of
visible key blocks of each query block as the paper describes it (LongGen, arXiv 2410.01485, section 3):

- AttnSink (sink_window): "each query block attends to the first `num_sink_blocks` blocks (the sink) and
  to the most recent `num_window_blocks` blocks, its own included";
- BlockSparse (block_strided): "each query block attends to its `num_local_blocks` most recent blocks,
  its own included, and to every `stride_blocks`-th block before it, starting at block 0";

then keep, inside those blocks, the keys at or before the query (token-level causality). Block-level
loops (nB^2 iterations) keep them usable at a few thousand tokens; the token mask is [S, S].
"""

from __future__ import annotations

import torch


def visible_key_blocks(pattern, qb: int) -> set[int]:
    """The key blocks query block `qb` sees, from the paper's definition of the variant."""
    if pattern.name == "sink_window":
        sink = set(range(min(pattern.num_sink_blocks, qb + 1)))
        window = set(range(max(0, qb - pattern.num_window_blocks + 1), qb + 1))
        return sink | window
    if pattern.name == "block_strided":
        local = set(range(max(0, qb - pattern.num_local_blocks + 1), qb + 1))
        strided = set(range(0, qb + 1, pattern.stride_blocks))
        return local | strided
    raise ValueError(f"no independent definition for pattern {pattern!r}")


def independent_block_mask(pattern, num_blocks: int) -> torch.Tensor:
    """[nB, nB] bool: query block i sees key block j."""
    keep = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    for qb in range(num_blocks):
        for kb in visible_key_blocks(pattern, qb):
            keep[qb, kb] = True
    return keep


def independent_token_mask(pattern, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[S, S] bool: query i sees key j (its block is visible and j <= i)."""
    b = pattern.block_size
    nb = -(-seq_len // b)
    blocks = independent_block_mask(pattern, nb)
    token = blocks.repeat_interleave(b, dim=0)[:seq_len].repeat_interleave(b, dim=1)[:, :seq_len]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return (token & causal).to(device)


def causal_token_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[S, S] bool: dense causal (full layers)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
