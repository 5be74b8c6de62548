"""Triton forward kernel of the block-sparse flash attention (`triton_block_sparse.py` launches it).

Legend: B = batch, N = query heads, G = KV heads, S = sequence, H = head dim (HEAD_DIM), BM / BN = query /
key tile (BLOCK_M / BLOCK_N tokens), W = tile-table width.

One program per (query tile, batch x head). It walks the query tile's row of the tile table (`tiles.py`):
first the *full* key tiles (no mask at all), then the *partial* ones, whose token mask is rebuilt from the
row-sub-block keep bits, causality and the sequence end. Online softmax in base 2 (scores pre-multiplied
by log2(e)); writes out and the fp32 natural-log LSE. With HAS_INIT the program starts from a normalised
partial result (out, lse) over other keys instead of from zero (the cuDNN + Triton composition).

An optional submodule: it imports Triton at module level and is imported only when a kernel is launched
(set TRITON_INTERPRET=1 before that to run it on CPU tensors).
"""

import triton
import triton.language as tl


@triton.jit
def fwd_kernel(
    Q, K, V, O, LSE, O_INIT, LSE_INIT,
    KV_IDX, KV_BITS, KV_FULL, KV_CNT,
    sqb, sqn, sqs, skb, skg, sks, svb, svg, svs, sob, son, sos, sib, sin, sis,
    N, NUM_GROUPS, S, W, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_SUB: tl.constexpr, COL_SUB: tl.constexpr,
    HAS_INIT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // N).to(tl.int64)  # 64-bit offsets: 128K x 64 heads x 128 passes 2^31 elements
    n = (pid_bh % N).to(tl.int64)
    g = n // (N // NUM_GROUPS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q = tl.load(
        Q + b * sqb + n * sqn + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    k_base = K + b * skb + g * skg
    v_base = V + b * svb + g * svg
    if HAS_INIT:
        # Start from a normalised partial result (o, lse) over other keys: m = lse (base 2), l = 1.
        lse_init = tl.load(LSE_INIT + pid_bh * S + offs_m, mask=row_ok, other=float("-inf"))
        started = lse_init > float("-inf")
        m_i = tl.where(started, lse_init * 1.4426950408889634, float("-inf"))
        l_i = tl.where(started, 1.0, 0.0)
        acc = tl.load(
            O_INIT + b * sib + n * sin + offs_m.to(tl.int64)[:, None] * sis + offs_d[None, :],
            mask=(row_ok & started)[:, None],
            other=0.0,
        ).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = tl.load(KV_FULL + pid_m)
    n_all = tl.load(KV_CNT + pid_m)
    row = pid_m * W
    for j in range(n_full):
        start = tl.load(KV_IDX + row + j) * BLOCK_N
        kpos = start + offs_n
        k = tl.load(k_base + start.to(tl.int64) * sks + offs_n[None, :] * sks + offs_d[:, None])
        v = tl.load(v_base + start.to(tl.int64) * svs + offs_n[:, None] * svs + offs_d[None, :])
        qk = tl.dot(q, k) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # Bit index of each (row, column) sub-block pair inside a tile (see tiles.tile_bits).
    bit = ((offs_m - pid_m * BLOCK_M) // ROW_SUB)[:, None] * (BLOCK_N // COL_SUB) + (offs_n // COL_SUB)[
        None, :
    ]
    for j in range(n_full, n_all):
        start = tl.load(KV_IDX + row + j) * BLOCK_N
        bits = tl.load(KV_BITS + row + j)
        kpos = start + offs_n
        col_ok = kpos < S
        k = tl.load(
            k_base + start.to(tl.int64) * sks + offs_n[None, :] * sks + offs_d[:, None],
            mask=col_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_base + start.to(tl.int64) * svs + offs_n[:, None] * svs + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        visible = (((bits >> bit) & 1) != 0) & (kpos[None, :] <= offs_m[:, None]) & col_ok[None, :]
        qk = tl.where(visible, tl.dot(q, k) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(
        has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf")
    )
    tl.store(
        O + b * sob + n * son + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE + pid_bh * S + offs_m, lse, mask=row_ok)
