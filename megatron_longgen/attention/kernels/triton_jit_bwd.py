"""Triton backward kernels of the block-sparse flash attention (`triton_block_sparse.py` launches them).

Legend: B = batch, N = query heads, G = KV heads, r = N / G, S = sequence, H = head dim (HEAD_DIM), BM / BN
= query / key tile (BLOCK_M / BLOCK_N tokens), W / WT = width of the tile table / transposed table.

FlashAttention-2 split, no atomics:
- `delta_kernel`: delta = rowsum(dO * O) - dLSE per query row (an incoming LSE gradient enters here:
  d lse / d s = p);
- `dkdv_kernel`: one program per (key tile, batch x KV head), walking the transposed tile table over the
  r query heads of its group; programs are launched longest-first (Q_ORDER) so that the sink / stride key
  tiles, which every later query sees, do not form a tail;
- `dq_kernel`: the forward's loop, accumulating dQ.
Every kernel can ACCUMULATE into existing gradients (the cuDNN + Triton composition adds its share).

An optional submodule: it imports Triton at module level and is imported only when a kernel is launched
(set TRITON_INTERPRET=1 before that to run it on CPU tensors).
"""

import triton
import triton.language as tl


@triton.jit
def delta_kernel(
    O, DO, DLSE, DELTA, sob, son, sos, sdb, sdn, sds, N, S,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // N).to(tl.int64)  # 64-bit offsets: 128K x 64 heads x 128 passes 2^31 elements
    n = (pid_bh % N).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < S
    o = tl.load(
        O + b * sob + n * son + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * sdb + n * sdn + offs_m.to(tl.int64)[:, None] * sds + offs_d[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        dlse = tl.load(DLSE + pid_bh * S + offs_m, mask=ok, other=0.0)
        delta -= tl.where(dlse == dlse, dlse, 0.0)  # noqa: PLR0124  (NaN test: rows without keys)
    tl.store(DELTA + pid_bh * S + offs_m, delta, mask=ok)


@triton.jit
def dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    KV_IDX, KV_BITS, KV_FULL, KV_CNT,
    sqb, sqn, sqs, skb, skg, sks, svb, svg, svs, sdb, sdn, sds, sgb, sgn, sgs,
    N, NUM_GROUPS, S, W, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_SUB: tl.constexpr, COL_SUB: tl.constexpr,
    ACCUMULATE: tl.constexpr,
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
    do = tl.load(
        DO + b * sdb + n * sdn + offs_m.to(tl.int64)[:, None] * sds + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    lse2 = tl.load(LSE + pid_bh * S + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(DELTA + pid_bh * S + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + g * skg
    v_base = V + b * svb + g * svg
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = tl.load(KV_FULL + pid_m)
    n_all = tl.load(KV_CNT + pid_m)
    row = pid_m * W
    for j in range(n_full):
        start = tl.load(KV_IDX + row + j) * BLOCK_N
        kpos = start + offs_n
        k = tl.load(k_base + start.to(tl.int64) * sks + offs_n[:, None] * sks + offs_d[None, :])
        v = tl.load(v_base + start.to(tl.int64) * svs + offs_n[:, None] * svs + offs_d[None, :])
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    bit = ((offs_m - pid_m * BLOCK_M) // ROW_SUB)[:, None] * (BLOCK_N // COL_SUB) + (offs_n // COL_SUB)[
        None, :
    ]
    for j in range(n_full, n_all):
        start = tl.load(KV_IDX + row + j) * BLOCK_N
        bits = tl.load(KV_BITS + row + j)
        kpos = start + offs_n
        col_ok = kpos < S
        k = tl.load(
            k_base + start.to(tl.int64) * sks + offs_n[:, None] * sks + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + start.to(tl.int64) * svs + offs_n[:, None] * svs + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        visible = (((bits >> bit) & 1) != 0) & (kpos[None, :] <= offs_m[:, None]) & col_ok[None, :]
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    dq_ptr = DQ + b * sgb + n * sgn + offs_m.to(tl.int64)[:, None] * sgs + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    Q_IDX, Q_BITS, Q_FULL, Q_CNT, Q_ORDER,
    sqb, sqn, sqs, skb, skg, sks, svb, svg, svs, sdb, sdn, sds,
    skgb, skgg, skgs, svgb, svgg, svgs,
    N, NUM_GROUPS, NUM_BG, S, WT, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_SUB: tl.constexpr, COL_SUB: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_bg = pid % NUM_BG  # programs run key tiles longest-first (Q_ORDER), all heads of one together
    kt = tl.load(Q_ORDER + pid // NUM_BG)
    b = (pid_bg // NUM_GROUPS).to(tl.int64)
    g = (pid_bg % NUM_GROUPS).to(tl.int64)
    r = N // NUM_GROUPS
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < S
    k = tl.load(
        K + b * skb + g * skg + offs_n.to(tl.int64)[:, None] * sks + offs_d[None, :],
        mask=col_ok[:, None],
        other=0.0,
    )
    v = tl.load(
        V + b * svb + g * svg + offs_n.to(tl.int64)[:, None] * svs + offs_d[None, :],
        mask=col_ok[:, None],
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    n_full = tl.load(Q_FULL + kt)
    n_all = tl.load(Q_CNT + kt)
    row = kt * WT
    for i in range(n_full * r):
        j = i // r
        n = g * r + i % r
        m0 = tl.load(Q_IDX + row + j) * BLOCK_M
        offs_m = m0 + offs_m0
        m0 = m0.to(tl.int64)  # 64-bit tile offset, 32-bit offsets inside the tile
        q = tl.load(Q + b * sqb + n * sqn + m0 * sqs + offs_m0[:, None] * sqs + offs_d[None, :])
        do = tl.load(DO + b * sdb + n * sdn + m0 * sds + offs_m0[:, None] * sds + offs_d[None, :])
        lse2 = tl.load(LSE + (b * N + n) * S + offs_m) * 1.4426950408889634
        delta = tl.load(DELTA + (b * N + n) * S + offs_m)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    # [key, query] bit index of each (query row, key column) sub-block pair (see tiles.tile_bits).
    bit_t = (offs_m0 // ROW_SUB)[None, :] * (BLOCK_N // COL_SUB) + ((offs_n - kt * BLOCK_N) // COL_SUB)[
        :, None
    ]
    for i in range(n_full * r, n_all * r):
        j = i // r
        n = g * r + i % r
        qt = tl.load(Q_IDX + row + j)
        bits = tl.load(Q_BITS + row + j)
        offs_m = qt * BLOCK_M + offs_m0
        row_ok = offs_m < S
        m0 = (qt * BLOCK_M).to(tl.int64)
        q_ptr = Q + b * sqb + n * sqn + m0 * sqs + offs_m0[:, None] * sqs + offs_d[None, :]
        do_ptr = DO + b * sdb + n * sdn + m0 * sds + offs_m0[:, None] * sds + offs_d[None, :]
        q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr, mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + (b * N + n) * S + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
        delta = tl.load(DELTA + (b * N + n) * S + offs_m, mask=row_ok, other=0.0)
        keep = ((bits >> bit_t) & 1) != 0
        visible = keep & (offs_n[:, None] <= offs_m[None, :]) & row_ok[None, :] & col_ok[:, None]
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * sm_scale
    dk_ptr = DK + b * skgb + g * skgg + offs_n.to(tl.int64)[:, None] * skgs + offs_d[None, :]
    dv_ptr = DV + b * svgb + g * svgg + offs_n.to(tl.int64)[:, None] * svgs + offs_d[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptr, mask=col_ok[:, None], other=0.0).to(tl.float32)
        dv += tl.load(dv_ptr, mask=col_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
