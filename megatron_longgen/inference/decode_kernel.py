"""Split-KV decode attention in Triton: one query per row over a preallocated cache whose valid length is a
device tensor (so a CUDA graph can replay it while the cache grows).

Legend: B = batch rows, N = query heads, G = KV heads, C = cache slots, H = head dim, P = splits.

Why: a decode step of a 128K full layer reads the whole K/V (2 GiB for the 7B shape) and computes almost
nothing, so it must spread the read over every SM. With one query per row, B x N programs would use a
quarter of an H200; splitting the keys into P chunks (flash-decoding) gives B x N x P programs. Each writes
a partial (out, lse); a few torch ops merge them (softmax over the P partial LSEs). The loop bound comes
from `kv_len` in device memory, so the launch itself (grid, shapes) never changes as the cache fills.

Keys [0, kv_len[b]) of row b are attended; slots beyond are never read (no mask). GQA: query head n reads
KV head n // (N / G). Arithmetic in fp32; the output is in the query dtype. Triton is imported lazily;
under TRITON_INTERPRET=1 the kernel also runs on CPU tensors (tests only).
"""

from __future__ import annotations

import functools
import math

import torch

_LOG2E = 1.4426950408889634


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kv_decode(
        Q, K, V, KV_LEN, O_PART, L_PART,
        sqb, sqn, skb, skg, sks, svb, svg, svs,
        N, NUM_GROUPS, SPLIT_LEN, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    ):  # fmt: skip
        split = tl.program_id(0)
        bn = tl.program_id(1)
        b = (bn // N).to(tl.int64)
        n = (bn % N).to(tl.int64)
        g = n // (N // NUM_GROUPS)
        kv_len = tl.load(KV_LEN + b)
        start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, kv_len)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sqb + n * sqn + offs_d).to(tl.float32) * qk_scale_log2
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        k_base = K + b * skb + g * skg
        v_base = V + b * svb + g * svg
        for s in range(start, end, BLOCK_N):
            offs_n = s + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            k = tl.load(
                k_base + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :], mask=valid[:, None], other=0.0
            )
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            scores = tl.where(valid, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))  # finite: every block holds a valid key
            p = tl.exp2(scores - m_new)
            alpha = tl.exp2(m_i - m_new)
            v = tl.load(
                v_base + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :], mask=valid[:, None], other=0.0
            )
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        part = bn * NUM_SPLITS + split
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)
        tl.store(O_PART + part * HEAD_DIM + offs_d, out)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(L_PART + part + tl.arange(0, 1), lse)

    return split_kv_decode


def num_splits_for(capacity: int, *, rows_x_heads: int, sm_count: int = 132, min_split: int = 512) -> int:
    """Enough splits for ~4 programs per SM (loads in flight hide the memory latency), none shorter than
    `min_split` keys (each split costs a partial result and its share of the merge)."""
    want = max(1, -(-4 * sm_count // max(rows_x_heads, 1)))
    return max(1, min(want, capacity // min_split))


def split_kv_decode(
    q_BNH: torch.Tensor,
    k_BGCH: torch.Tensor,
    v_BGCH: torch.Tensor,
    kv_len_B: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Attention of one query per row over keys [0, kv_len[b]) of a cache -> out_BNH (q's dtype).

    `k_BGCH` / `v_BGCH` may be strided views (the last dim contiguous); `kv_len_B` is int32/int64 on the
    device, every entry in [1, C]."""
    B, N, H = q_BNH.shape
    G, C = k_BGCH.shape[1], k_BGCH.shape[2]
    if N % G:
        raise ValueError(f"query heads {N} must be a multiple of kv heads {G}")
    if H not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {H} is not supported (16, 32, 64, 128, 256)")
    if q_BNH.stride(-1) != 1 or k_BGCH.stride(-1) != 1 or v_BGCH.stride(-1) != 1:
        raise ValueError("the head dimension of q, k and v must be contiguous")
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q_BNH.device).multi_processor_count if q_BNH.is_cuda else 4
        num_splits = num_splits_for(C, rows_x_heads=B * N, sm_count=sms)
    split_len = -(-C // num_splits)
    split_len = -(-split_len // block_n) * block_n
    o_part = torch.empty(B * N * num_splits, H, dtype=torch.float32, device=q_BNH.device)
    l_part = torch.empty(B * N * num_splits, dtype=torch.float32, device=q_BNH.device)
    scale = scale if scale is not None else 1.0 / math.sqrt(H)
    _kernel()[(num_splits, B * N)](
        q_BNH, k_BGCH, v_BGCH, kv_len_B, o_part, l_part,
        q_BNH.stride(0), q_BNH.stride(1), k_BGCH.stride(0), k_BGCH.stride(1), k_BGCH.stride(2),
        v_BGCH.stride(0), v_BGCH.stride(1), v_BGCH.stride(2),
        N, G, split_len, scale * _LOG2E,
        HEAD_DIM=H, BLOCK_N=block_n, NUM_SPLITS=num_splits,
    )  # fmt: skip
    # Merge the splits: softmax over their (base-2) LSEs weights their normalised outputs.
    lse = l_part.view(B, N, num_splits)
    weights = torch.softmax(lse * math.log(2.0), dim=-1)
    out = (weights.unsqueeze(-1) * o_part.view(B, N, num_splits, H)).sum(dim=2)
    return out.to(q_BNH.dtype)
