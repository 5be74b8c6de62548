"""Ring attention (full layers) and the KV-reduced exchange (sparse layers) against the dense oracle.

Legend: B = batch, N = query heads, G = KV heads, S = global sequence, H = head dim, R = CP size.

Four gloo ranks are started once for the module. Each runs every case twice: with R = 4 over the whole
world, and with R = 2 over the non-contiguous groups {0, 2} and {1, 3} (so neighbour ranks must be
translated with `dist.get_global_rank`). For each case the rank compares its shard of the output and of
dQ/dK/dV with the same shard of an fp64 oracle run on the full sequence (`reference_attention` with the
mask written independently of the patterns' rule (tests/attention/independent_masks.py), autograd for
gradients). Inputs are fp32, so the tolerance is fp32 round-off.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.helpers.distributed import run_distributed

SEQ = 128
CASES = [
    # name, pattern kwargs (None = full layer), num_heads, kv_heads
    ("full_mha", None, 4, 4),
    ("full_gqa", None, 4, 2),
    ("sink_window_mha", {"variant": "sink_window", "num_sink_blocks": 1, "num_window_blocks": 3}, 4, 4),
    ("sink_window_gqa_wide", {"variant": "sink_window", "num_sink_blocks": 2, "num_window_blocks": 5}, 4, 2),
    ("block_strided_mha", {"variant": "block_strided", "stride_blocks": 3, "num_local_blocks": 2}, 4, 4),
    ("block_strided_gqa", {"variant": "block_strided", "stride_blocks": 4, "num_local_blocks": 1}, 4, 1),
]
TOL = 2e-5


def _pattern(kwargs):
    from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern

    kwargs = dict(kwargs)
    variant = kwargs.pop("variant")
    cls = SinkWindowPattern if variant == "sink_window" else BlockStridedPattern
    return cls(block_size=8, **kwargs)


def _run_case(name, pattern_kwargs, num_heads, kv_heads, group, cp_rank, cp_size):
    from megatron_longgen.attention.reference import reference_attention
    from megatron_longgen.context_parallel.exchange_plan import plan_sparse_exchange
    from megatron_longgen.context_parallel.ring_attention import ring_attention
    from megatron_longgen.context_parallel.sharding import shard_sequence
    from megatron_longgen.context_parallel.sparse_exchange import sparse_cp_attention
    from tests.attention.independent_masks import causal_token_mask, independent_token_mask

    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    B, H = 2, 16
    q = torch.randn(B, num_heads, SEQ, H, generator=gen, dtype=torch.float64)
    k = torch.randn(B, kv_heads, SEQ, H, generator=gen, dtype=torch.float64)
    v = torch.randn(B, kv_heads, SEQ, H, generator=gen, dtype=torch.float64)
    d_out = torch.randn(B, num_heads, SEQ, H, generator=gen, dtype=torch.float64)
    pattern = None if pattern_kwargs is None else _pattern(pattern_kwargs)
    mask = causal_token_mask(SEQ) if pattern is None else independent_token_mask(pattern, SEQ)

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference_attention(qr, kr, vr, mask)
    ref_out.backward(d_out)

    def shard(t):
        return shard_sequence(t, cp_rank=cp_rank, cp_size=cp_size, seq_dim=2)

    ql, kl, vl = (shard(t).float().requires_grad_() for t in (q, k, v))
    if pattern is None:
        out, lse = ring_attention(ql, kl, vl, cp_group=group, kernel="math")
        moved = None
    else:
        out, lse = sparse_cp_attention(ql, kl, vl, pattern=pattern, cp_group=group, kernel="torch")
        plan = plan_sparse_exchange(pattern, cp_rank=cp_rank, cp_size=cp_size, seq_len=SEQ)
        moved = plan.forward_bytes(batch=B, kv_heads=kv_heads, head_dim=H, element_size=4)
    out.backward(shard(d_out).float())

    def err(a, b):
        return float((a.double() - b).abs().max())

    return {
        "out": err(out, shard(ref_out.detach())),
        "lse": err(lse, shard(ref_lse.detach())),
        "dq": err(ql.grad, shard(qr.grad)),
        "dk": err(kl.grad, shard(kr.grad)),
        "dv": err(vl.grad, shard(vr.grad)),
        "moved": moved,
    }


def _expect_value_error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _worker(rank, world_size):
    import torch.distributed as dist

    from megatron_longgen.context_parallel.ring_attention import ring_attention
    from megatron_longgen.context_parallel.sparse_exchange import sparse_cp_attention

    groups = {4: dist.group.WORLD}
    pair_groups = [dist.new_group(ranks=[0, 2]), dist.new_group(ranks=[1, 3])]
    groups[2] = pair_groups[rank % 2]
    lone = dist.new_group(ranks=[0])
    results = {}
    for cp_size, group in groups.items():
        cp_rank = dist.get_rank(group)
        for name, kwargs, n, g in CASES:
            results[(cp_size, name)] = _run_case(name, kwargs, n, g, group, cp_rank, cp_size)

    # Bad input, raised before any communication (so no rank is left waiting).
    x = torch.zeros(1, 2, 6, 4)
    errors = {
        "odd_local": _expect_value_error(
            lambda: ring_attention(x[:, :, :5], x[:, :, :5], x[:, :, :5], cp_group=groups[4], kernel="math")
        ),
        "qk_len": _expect_value_error(
            lambda: ring_attention(x, x[:, :, :4], x[:, :, :4], cp_group=groups[4], kernel="math")
        ),
        "gqa": _expect_value_error(
            lambda: ring_attention(
                x, x[:, :1].expand(1, 3, 6, 4), x[:, :1].expand(1, 3, 6, 4), cp_group=groups[4], kernel="math"
            )
        ),
        "not_member": _expect_value_error(lambda: ring_attention(x, x, x, cp_group=lone, kernel="math"))
        if rank
        else "member",
        "no_group": _expect_value_error(lambda: ring_attention(x, x, x, cp_group=None, kernel="math")),
        "sparse_len": _expect_value_error(
            lambda: sparse_cp_attention(
                x, x, x, pattern=_pattern({"variant": "sink_window"}), cp_group=groups[4], kernel="torch"
            )
        ),
        "sparse_flex_cpu": _expect_value_error(
            lambda: sparse_cp_attention(
                x, x, x, pattern=_pattern({"variant": "sink_window"}), cp_group=groups[4], kernel="flex"
            )
        ),
        "bad_kernel": _expect_value_error(
            lambda: ring_attention(x, x, x, cp_group=groups[4], kernel="flash")
        ),
    }
    return {"results": results, "errors": errors}


@pytest.fixture(scope="module")
def cp_results():
    return run_distributed(_worker, world_size=4, timeout_s=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_matches_oracle(cp_results, cp_size, case):
    for rank, res in enumerate(cp_results):
        errs = res["results"][(cp_size, case)]
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert errs[key] < TOL, f"rank {rank} cp {cp_size} {case}: max |{key} - oracle| = {errs[key]:.3g}"


@pytest.mark.timeout(300)
def test_sparse_exchange_moves_few_blocks(cp_results):
    # Per rank, the sparse exchange must move less than an all-gather of K/V would receive.
    for cp_size in (2, 4):
        for name, kwargs, _, g in CASES:
            if kwargs is None:
                continue
            allgather = (cp_size - 1) * (SEQ // cp_size) * 2 * 2 * g * 16 * 4
            for res in cp_results:
                moved = res["results"][(cp_size, name)]["moved"]
                assert moved["received"] < allgather, (cp_size, name, moved, allgather)


@pytest.mark.timeout(300)
def test_bad_input_errors(cp_results):
    for _rank, res in enumerate(cp_results):
        e = res["errors"]
        assert "must be even" in e["odd_local"], e
        assert "lengths differ" in e["qk_len"], e
        assert "multiple of kv heads 3" in e["gqa"], e
        assert e["not_member"] == "member" or "not a member" in e["not_member"], e
        assert "group is required" in e["no_group"], e
        assert "seq_len 24 must be a multiple of 2·cp·block = 2·4·8 = 64" in e["sparse_len"], e
        assert "cannot run on cpu" in e["bad_kernel"], e
        assert "'flex' cannot run: FlexAttention runs compiled only on CUDA" in e["sparse_flex_cpu"], e
