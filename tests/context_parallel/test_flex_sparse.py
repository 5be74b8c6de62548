"""The Flex path of sparse CP attention (block mask built from the exchange plan) against the PyTorch
block kernel and the dense oracle, per rank, without a process group: each rank's [local | fetched] keys
are gathered from the full sequence at the plan's key positions, exactly what the exchange delivers.

FlexAttention runs eagerly on CPU (forward only: torch refuses its backward on CPU); its gradients are
checked on GPU by tools/bench_context_parallel.py, against the oracle.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longgen.attention.kernels.torch_block import block_sparse_attention_torch
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern
from megatron_longgen.attention.reference import reference_attention
from megatron_longgen.context_parallel.flex_sparse import flex_cp_attention, flex_unavailable_reason
from megatron_longgen.context_parallel.sharding import shard_sequence
from megatron_longgen.context_parallel.sparse_exchange import plan_sparse_exchange

PATTERNS = {
    "sink_window": SinkWindowPattern(block_size=64, num_sink_blocks=1, num_window_blocks=3),
    "block_strided": BlockStridedPattern(block_size=64, stride_blocks=3, num_local_blocks=2),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_flex_matches_block_kernel_and_oracle(cp_size, name):
    pytest.importorskip("torch.nn.attention.flex_attention")
    pattern = PATTERNS[name]
    S, n, g, h = 512, 4, 2, 32
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, x, S, h, generator=gen) for x in (n, g, g))
    ref, ref_lse = reference_attention(q, k, v, pattern.dense_mask(S))
    for rank in range(cp_size):
        plan = plan_sparse_exchange(pattern, cp_rank=rank, cp_size=cp_size, seq_len=S)
        q_l = shard_sequence(q, cp_rank=rank, cp_size=cp_size, seq_dim=2)
        k_all, v_all = k[:, :, plan.k_positions], v[:, :, plan.k_positions]
        out, lse = flex_cp_attention(q_l, k_all, v_all, plan=plan, compiled=False)
        blk, blk_lse = block_sparse_attention_torch(
            q_l,
            k_all,
            v_all,
            kv_table=plan.kv_table,
            block_size=64,
            q_positions=plan.q_positions,
            k_positions=plan.k_positions,
        )
        want = shard_sequence(ref, cp_rank=rank, cp_size=cp_size, seq_dim=2)
        want_lse = shard_sequence(ref_lse, cp_rank=rank, cp_size=cp_size, seq_dim=2)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(blk, want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(blk_lse, want_lse, atol=2e-5, rtol=1e-5)


def test_flex_refuses_cpu_and_odd_tiles():
    plan = plan_sparse_exchange(PATTERNS["sink_window"], cp_rank=0, cp_size=2, seq_len=512)
    assert "needs CUDA" in flex_unavailable_reason(plan=plan, device=torch.device("cpu"))
    odd = plan_sparse_exchange(SinkWindowPattern(block_size=48), cp_rank=0, cp_size=2, seq_len=384)
    assert "needs block_size 48 | 128" in flex_unavailable_reason(plan=odd, device=torch.device("cuda"))
