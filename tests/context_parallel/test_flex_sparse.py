"""The Flex kernel of sparse CP attention (block mask built from the exchange plan by the one
`flex_block_mask` helper) against the PyTorch block kernel and the dense oracle, per rank, without a
process group: each rank's [local | fetched] keys are gathered from the full sequence at the plan's key
positions, exactly what the exchange delivers.

FlexAttention runs eagerly on CPU; torch refuses its backward on CPU by a device guard, which the tests
lift (test-only patch) to check gradients through out and lse too. The oracle's mask is written
independently of the patterns' rule (tests/attention/independent_masks.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_longgen.attention.kernels.flex import flex_unavailable_reason
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern
from megatron_longgen.attention.reference import reference_attention
from megatron_longgen.context_parallel.exchange_plan import plan_sparse_exchange
from megatron_longgen.context_parallel.sharding import shard_sequence
from megatron_longgen.context_parallel.sparse_exchange import attend_exchanged, exchange_block_mask
from tests.attention.independent_masks import independent_token_mask

PATTERNS = {
    "sink_window": SinkWindowPattern(block_size=64, num_sink_blocks=1, num_window_blocks=3),
    "block_strided": BlockStridedPattern(block_size=64, stride_blocks=3, num_local_blocks=2),
    # debug_tiny's 16-token blocks: 8 x 8 block pairs per 128-token Flex tile
    "sink_window_b16": SinkWindowPattern(block_size=16, num_sink_blocks=1, num_window_blocks=4),
    "block_strided_b16": BlockStridedPattern(block_size=16, stride_blocks=4, num_local_blocks=2),
}


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    from torch.nn.attention import flex_attention as flex_mod

    monkeypatch.setattr(flex_mod, "_validate_device", lambda *args, **kwargs: None)


def _run(fn, q, k, v, d_out, d_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    return out, lse, q.grad, k.grad, v.grad


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "name, cp_size",
    [("sink_window", 2), ("sink_window", 4), ("block_strided", 2), ("block_strided", 4),
     ("sink_window_b16", 2), ("block_strided_b16", 4)],
)  # fmt: skip
def test_flex_matches_block_kernel_and_oracle(flex_backward_on_cpu, name, cp_size):
    pattern = PATTERNS[name]
    S, n, g, h = 512, 4, 2, 32
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, x, S, h, generator=gen) for x in (n, g, g))
    ref, ref_lse = reference_attention(q, k, v, independent_token_mask(pattern, S))
    for rank in range(cp_size):
        plan = plan_sparse_exchange(pattern, cp_rank=rank, cp_size=cp_size, seq_len=S)
        q_l = shard_sequence(q, cp_rank=rank, cp_size=cp_size, seq_dim=2)
        k_all, v_all = k[:, :, plan.k_positions], v[:, :, plan.k_positions]
        d_out = torch.randn(q_l.shape, generator=gen)
        d_lse = torch.randn(q_l.shape[:3], generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
            flex = _run(
                lambda a, b, c, plan=plan: attend_exchanged(a, b, c, plan=plan, kernel="flex", compiled=False),
                q_l, k_all, v_all, d_out, d_lse,
            )  # fmt: skip
        blk = _run(
            lambda a, b, c, plan=plan: attend_exchanged(a, b, c, plan=plan, kernel="torch"),
            q_l, k_all, v_all, d_out, d_lse,
        )  # fmt: skip
        want = shard_sequence(ref, cp_rank=rank, cp_size=cp_size, seq_dim=2)
        want_lse = shard_sequence(ref_lse, cp_rank=rank, cp_size=cp_size, seq_dim=2)
        for got in (flex, blk):
            torch.testing.assert_close(got[0], want, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], want_lse, atol=2e-5, rtol=1e-5)
        for what, a, b in zip(["dq", "dk", "dv"], flex[2:], blk[2:]):
            torch.testing.assert_close(
                a, b, atol=2e-5, rtol=1e-5, msg=lambda m, w=f"rank {rank} {what}": f"{w}: {m}"
            )


def test_flex_block_mask_of_a_plan_lists_only_needed_tiles():
    """The plan's Flex mask is block-level (tables [1, 1, nQT, nKT]) and every listed tile holds a pair
    the rank's queries see (positions are global: causality across ranks)."""
    pattern = PATTERNS["sink_window_b16"]
    S, cp = 2048, 2
    for rank in range(cp):
        plan = plan_sparse_exchange(pattern, cp_rank=rank, cp_size=cp, seq_len=S)
        mask = exchange_block_mask(plan, torch.device("cpu"))
        dense = independent_token_mask(pattern, S)[plan.q_positions][:, plan.k_positions]
        n_qt = -(-plan.q_positions.numel() // 128)
        assert mask.kv_num_blocks.shape == (1, 1, n_qt)
        for i in range(n_qt):
            for which in ("kv", "full_kv"):
                num, idx = getattr(mask, f"{which}_num_blocks"), getattr(mask, f"{which}_indices")
                for j in idx[0, 0, i, : int(num[0, 0, i])].tolist():
                    tile = dense[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
                    assert bool(tile.all() if which == "full_kv" else tile.any()), (rank, which, i, j)
        assert exchange_block_mask(plan, torch.device("cpu")) is mask  # cached per plan


def test_flex_refuses_cpu_and_blocks_that_are_not_multiples_of_16():
    assert "compiled only on CUDA" in flex_unavailable_reason(device=torch.device("cpu"), dtype=torch.float32)
    odd = SinkWindowPattern(block_size=24)
    reason = flex_unavailable_reason(device=torch.device("cuda"), dtype=torch.bfloat16, pattern=odd)
    assert "pattern block 24 is not a multiple of 16" in reason
    assert (
        flex_unavailable_reason(
            device=torch.device("cuda"), dtype=torch.bfloat16, pattern=PATTERNS["sink_window_b16"]
        )
        is None
    )
