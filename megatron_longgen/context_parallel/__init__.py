"""Context parallelism: one zig-zag token layout for every layer type.

- `sharding.py`: pure index maths (2·CP chunks, rank r holds chunks r and 2·CP−1−r) and the data path,
  `shard_batch_for_cp(batch, cp_rank=, cp_size=, seq_dim=1, block_size=1)`.
- `ring_attention.py`: full layers, K/V rotating around the CP group with an fp32 LSE merge
  (`step_kernels.py`: cuDNN / flash / fp32 math per step; `ring_comm.py`: the P2P primitives).
- `sparse_exchange.py`: sparse layers, fetching only the sink/halo/strided blocks a rank's queries see
  (`flex_sparse.py`: the FlexAttention kernel used on CUDA).
- `core_attention.py`: the Megatron-Core `core_attention` modules (imports Megatron-Core; not re-exported
  here so that the functions above run where Megatron-Core is not installed).
"""

from megatron_longgen.context_parallel.ring_attention import ring_attention
from megatron_longgen.context_parallel.sharding import (
    check_cp_divisibility,
    shard_batch_for_cp,
    shard_sequence,
    unshard_sequence,
    zigzag_positions,
)
from megatron_longgen.context_parallel.sparse_exchange import plan_sparse_exchange, sparse_cp_attention

__all__ = [
    "check_cp_divisibility",
    "plan_sparse_exchange",
    "ring_attention",
    "shard_batch_for_cp",
    "shard_sequence",
    "sparse_cp_attention",
    "unshard_sequence",
    "zigzag_positions",
]
