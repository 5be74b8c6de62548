"""Context parallelism: one zig-zag token layout for every layer type.

- `sharding.py`: pure index maths (2·CP chunks, rank r holds chunks r and 2·CP−1−r) and the data path,
  `shard_batch_for_cp(batch, cp_rank=, cp_size=, seq_dim=1, block_size=1)`.
- `ring_attention.py`: full layers, K/V rotating around the CP group with an fp32 LSE merge
  (`step_kernels.py`: cuDNN / flash / fp32 math per step; `ring_comm.py`: the P2P primitives).
- `exchange_plan.py` + `sparse_exchange.py`: sparse layers, fetching only the sink/halo/strided blocks a
  rank's queries see (pure plan, then the exchange and the torch / Flex kernels over the fetched keys).

The Megatron-Core `core_attention` module that uses these (and picks the kernels) is
`attention/core_attention.py`; nothing here imports Megatron-Core.
"""

from megatron_longgen.context_parallel.exchange_plan import plan_sparse_exchange
from megatron_longgen.context_parallel.ring_attention import ring_attention
from megatron_longgen.context_parallel.sharding import (
    check_cp_divisibility,
    shard_batch_for_cp,
    shard_sequence,
    unshard_sequence,
    zigzag_positions,
)
from megatron_longgen.context_parallel.sparse_exchange import sparse_cp_attention

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
