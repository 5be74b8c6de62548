"""Triton block-sparse flash attention (forward + backward) driven by tile tables.

Legend: B = batch, N = query heads, G = KV heads, r = N / G, S = sequence, H = head dim, BM / BN = query /
key tile (tokens), nQT / nKT = query / key tiles, W = table width.

Layout, in the spirit of the Phi-3-small / S2-Attention block-sparse kernels: a CSR-like table per query
tile lists the key tiles it attends to (`tiles.TileTables`), full tiles first, partial ones after, so each
of the two loops is uniform (the full loop carries no mask at all). Partial tiles rebuild the token mask
from the row-sub-block bits, causality and the sequence end.

- forward: one program per (query tile, batch x head); online softmax in base 2; writes out and the fp32
  natural-log LSE;
- backward (FlashAttention-2 split, no atomics): a small kernel for delta = rowsum(dO * O) - dLSE; a dK/dV
  kernel with one program per (key tile, batch x KV head) that walks the transposed table over the r query
  heads of its group (launched longest-first, so the sink / stride key tiles, which every later query
  sees, do not form a tail); a dQ kernel with the forward's loop.

Differentiable through both outputs: an incoming LSE gradient enters as delta - dLSE (d lse / d s = p).
Triton is imported lazily; on a machine without it the kernel reports itself unavailable. Under
`TRITON_INTERPRET=1` it runs on CPU tensors (tests, tiny shapes only).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from megatron_longgen.attention.kernels.base import SparseAttentionKernel, register_kernel
from megatron_longgen.attention.kernels.tiles import TileTables, build_tile_tables
from megatron_longgen.attention.masks import SparsePattern
from megatron_longgen.utils.optional import has_triton

_LOG2E = 1.4426950408889634


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels():
    """Compile-on-first-use Triton kernels (imported lazily: triton is optional)."""
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
            lse2 = (
                tl.load(LSE + (b * N + n) * S + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
            )
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

    return fwd_kernel, delta_kernel, dq_kernel, dkdv_kernel


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes (tokens) and Triton launch options of one kernel."""

    block_m: int
    block_n: int
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class TritonConfig:
    """One launch config per kernel: forward, dQ, and dK/dV (whose table is the transpose of its tiles)."""

    fwd: LaunchConfig
    dq: LaunchConfig
    dkdv: LaunchConfig


# Measured on an H200 (bf16, 32 x 128 MHA and 64/8 x 128 GQA at 128K; tools/bench_attention.py --sweep,
# benchmarks/notes_attention.md). The dK/dV kernel dominates the time; small query tiles (32) with 64-key
# tiles and one warpgroup were its fastest configs for both patterns.
DEFAULT_CONFIGS: dict[str, TritonConfig] = {
    "sink_window": TritonConfig(
        fwd=LaunchConfig(128, 64, 8, 3), dq=LaunchConfig(128, 64, 8, 2), dkdv=LaunchConfig(32, 64, 4, 3)
    ),
    "block_strided": TritonConfig(
        fwd=LaunchConfig(128, 64, 8, 3), dq=LaunchConfig(128, 64, 8, 2), dkdv=LaunchConfig(32, 64, 4, 5)
    ),
}


def _opts(cfg: LaunchConfig) -> dict:
    if _interpret():
        return {}
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _tile_args(t: TileTables) -> dict:
    return {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "ROW_SUB": t.row_sub, "COL_SUB": t.col_sub}


def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: TileTables,
    launch: LaunchConfig,
    scale: float,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) over the key tiles of `table`.

    `init` = (out, lse) of the same queries over other keys (e.g. another kernel's share of the pattern):
    the result then covers both key sets, as if merged by log-sum-exp, and is written into those two
    tensors in place (each program reads its rows of `init` before writing them).
    """
    fwd_kernel, _, _, _ = _kernels()
    B, N, S, H = q.shape
    G = k.shape[1]
    if init is None:
        out = torch.empty_like(q)
        lse = torch.empty(B, N, S, dtype=torch.float32, device=q.device)
    else:
        out, lse = init
        if out.stride(-1) != 1 or lse.dtype != torch.float32 or not lse.is_contiguous():
            raise ValueError("init must be (out with a contiguous last dim, contiguous fp32 lse [B, N, S])")
    fwd_kernel[(table.num_q_tiles, B * N)](
        q, k, v, out, lse, out, lse,
        table.kv_idx, table.kv_bits, table.kv_full, table.kv_cnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        N, G, S, table.kv_idx.shape[1], scale * _LOG2E,
        HEAD_DIM=H, **_tile_args(table), HAS_INIT=init is not None, **_opts(launch),
    )  # fmt: skip
    return out, lse


def triton_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor | None,
    d_lse: torch.Tensor | None,
    table_dq: TileTables,
    table_kv: TileTables,
    config: TritonConfig,
    scale: float,
    *,
    accumulate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of the keys in the tables, given the final `out` / `lse` of all keys.

    With `accumulate` = (dq, dk, dv) of other keys (another kernel's share), this share is added into
    them in place and they are returned.
    """
    _, delta_kernel, dq_kernel, dkdv_kernel = _kernels()
    B, N, S, H = q.shape
    G = k.shape[1]
    d_out = torch.zeros_like(out) if d_out is None else _lastdim_contiguous(d_out.to(out.dtype))
    delta = torch.empty_like(lse)
    has_dlse = d_lse is not None
    d_lse = d_lse.float().contiguous() if has_dlse else lse
    delta_block = 64
    delta_kernel[(-(-S // delta_block), B * N)](
        out, d_out, d_lse, delta,
        out.stride(0), out.stride(1), out.stride(2), d_out.stride(0), d_out.stride(1), d_out.stride(2),
        N, S, HAS_DLSE=has_dlse, HEAD_DIM=H, BLOCK_M=delta_block,
    )  # fmt: skip
    if accumulate is None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    else:
        dq, dk, dv = accumulate
    qk_scale = scale * _LOG2E
    t_kv, t_dq = table_kv, table_dq
    dkdv_kernel[(t_kv.num_k_tiles * B * G, 1)](
        q, k, v, d_out, dk, dv, lse, delta,
        t_kv.q_idx, t_kv.q_bits, t_kv.q_full, t_kv.q_cnt, t_kv.q_order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), d_out.stride(0), d_out.stride(1), d_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        N, G, B * G, S, t_kv.q_idx.shape[1], qk_scale, scale,
        HEAD_DIM=H, **_tile_args(t_kv), ACCUMULATE=accumulate is not None, **_opts(config.dkdv),
    )  # fmt: skip
    dq_kernel[(t_dq.num_q_tiles, B * N)](
        q, k, v, d_out, dq, lse, delta,
        t_dq.kv_idx, t_dq.kv_bits, t_dq.kv_full, t_dq.kv_cnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), d_out.stride(0), d_out.stride(1), d_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        N, G, S, t_dq.kv_idx.shape[1], qk_scale, scale,
        HEAD_DIM=H, **_tile_args(t_dq), ACCUMULATE=accumulate is not None, **_opts(config.dq),
    )  # fmt: skip
    return dq, dk, dv


class _TritonBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tables: tuple[TileTables, TileTables, TileTables], config: TritonConfig, scale):
        q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
        out, lse = triton_forward(q, k, v, tables[0], config.fwd, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tables, ctx.config, ctx.scale = tables, config, scale
        ctx.set_materialize_grads(False)  # an unused LSE must not cost a zero-filled [B, N, S] gradient
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        _, t_dq, t_kv = ctx.tables
        dq, dk, dv = triton_backward(q, k, v, out, lse, d_out, d_lse, t_dq, t_kv, ctx.config, ctx.scale)
        return dq, dk, dv, None, None, None


class TritonBlockSparseKernel(SparseAttentionKernel):
    """Block-sparse flash attention in Triton (bf16/fp16 on CUDA; any float dtype under the interpreter).

    Args:
        config: tiles and launch options per kernel; None = `DEFAULT_CONFIGS[pattern.name]`, with tiles
            clipped to the pattern block size where the pattern uses blocks smaller than 64 tokens.
    """

    name = "triton"

    def __init__(self, *, config: TritonConfig | None = None):
        self.config = config
        self._tables: dict[tuple, TileTables] = {}

    @classmethod
    def unavailable_reason(cls, *, device: torch.device, dtype: torch.dtype) -> str | None:
        device = torch.device(device)
        if not has_triton():
            return "triton is not installed"
        if device.type != "cuda":
            # Under TRITON_INTERPRET=1 the kernel also runs on CPU tensors, but far too slowly for anything
            # but tests, which instantiate it directly; `auto` must never pick it there.
            return "the Triton kernel needs CUDA"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {dtype} is not supported on CUDA (bf16/fp16 only)"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "needs compute capability 8.0 or newer"
        return None

    def config_for(self, pattern: SparsePattern) -> TritonConfig:
        if self.config is not None:
            return self.config
        cfg = DEFAULT_CONFIGS[pattern.name]
        b = pattern.block_size
        if b >= 64:
            return cfg
        # Small test patterns: keep tiles and blocks nested (tiles of at most 2 x 2 pattern blocks).
        small = LaunchConfig(2 * b if b >= 16 else 16, max(b, 16))
        return TritonConfig(fwd=small, dq=small, dkdv=small)

    def _table(self, pattern, seq_len, device, cfg: LaunchConfig, transposed: bool) -> TileTables:
        key = (pattern, seq_len, str(device), cfg.block_m, cfg.block_n, transposed)
        if key not in self._tables:
            self._tables[key] = build_tile_tables(
                pattern,
                seq_len,
                block_m=cfg.block_m,
                block_n=cfg.block_n,
                device=device,
                transposed=transposed,
            )
        return self._tables[key]

    def tables_for(self, pattern, seq_len: int, device) -> tuple[TileTables, TileTables, TileTables]:
        """(forward, dQ, dK/dV) tile tables of `pattern` at `seq_len`, cached."""
        cfg = self.config_for(pattern)
        return (
            self._table(pattern, seq_len, device, cfg.fwd, False),
            self._table(pattern, seq_len, device, cfg.dq, False),
            self._table(pattern, seq_len, device, cfg.dkdv, True),
        )

    def __call__(self, q_BNSH, k_BGSH, v_BGSH, *, pattern: SparsePattern, softmax_scale=None):
        _, N, S, H = q_BNSH.shape
        if k_BGSH.shape[2] != S or v_BGSH.shape[2] != S:
            raise ValueError(
                f"sparse attention needs equal query and key lengths, got {S} and {k_BGSH.shape[2]}"
            )
        if N % k_BGSH.shape[1]:
            raise ValueError(f"query heads {N} must be a multiple of kv heads {k_BGSH.shape[1]}")
        if H not in (16, 32, 64, 128, 256):
            raise ValueError(f"head dim {H} is not supported by the Triton kernel (16, 32, 64, 128, 256)")
        cfg = self.config_for(pattern)
        tables = self.tables_for(pattern, S, q_BNSH.device)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(H)
        return _TritonBlockSparse.apply(q_BNSH, k_BGSH, v_BGSH, tables, cfg, scale)


register_kernel(TritonBlockSparseKernel, auto_rank=0)
