"""Triton block-sparse flash attention: launch configs, launchers and the autograd wrapper.

Legend: B = batch, N = query heads, G = KV heads, r = N / G, S = sequence, H = head dim, BM / BN = query /
key tile (tokens), nQT / nKT = query / key tiles, W = table width.

Layout, in the spirit of the Phi-3-small / S2-Attention block-sparse kernels: a CSR-like table per query
tile lists the key tiles it attends to (`tiles.TileTables`), full tiles first, partial ones after, so each
of the two loops is uniform (the full loop carries no mask at all). Partial tiles rebuild the token mask
from the row-sub-block bits, causality and the sequence end.

- `triton_jit_fwd.py`: the forward kernel (online softmax in base 2, out and the fp32 natural-log LSE);
- `triton_jit_bwd.py`: the backward kernels (delta, dK/dV over the transposed table, dQ);
- this file: tile configs per pattern, `triton_forward` / `triton_backward` (also used by `cudnn_bsa.py`
  to compose with cuDNN), the autograd function and the `triton` backend.

Differentiable through both outputs: an incoming LSE gradient enters as delta - dLSE (d lse / d s = p).
Triton is imported only when a kernel launches; on a machine without it the backend reports itself
unavailable. Under `TRITON_INTERPRET=1` it runs on CPU tensors (tests, tiny shapes only).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from megatron_longgen.attention.kernels.base import SparseAttentionKernel, register_kernel
from megatron_longgen.attention.kernels.tiles import TileTables, build_tile_tables, check_tiles
from megatron_longgen.attention.masks import SparsePattern
from megatron_longgen.utils.optional import has_triton

_LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128, 256)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    from megatron_longgen.attention.kernels.triton_jit_fwd import fwd_kernel

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
    from megatron_longgen.attention.kernels.triton_jit_bwd import delta_kernel, dkdv_kernel, dq_kernel

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
    def unavailable_reason(cls, *, device, dtype, pattern=None, head_dim=None) -> str | None:
        device = torch.device(device)
        if not has_triton():
            return "triton is not installed"
        if device.type != "cuda":
            # Under TRITON_INTERPRET=1 the kernel also runs on CPU tensors, but far too slowly for anything
            # but tests, which instantiate it directly; `auto` must never pick it there.
            return "the Triton kernel needs CUDA"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {dtype} is not supported on CUDA (bf16/fp16 only)"
        if head_dim is not None and head_dim not in HEAD_DIMS:
            return f"head dim {head_dim} is not supported (one of {HEAD_DIMS})"
        if pattern is not None:
            reason = cls().pattern_reason(pattern)
            if reason is not None:
                return reason
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "needs compute capability 8.0 or newer"
        return None

    def pattern_reason(self, pattern: SparsePattern) -> str | None:
        """None when this kernel's tiles fit `pattern` (powers of two >= 16 that nest with its blocks, at most
        30 block pairs per tile), else why not. Device-independent: checked on CPU too."""
        if pattern.name not in DEFAULT_CONFIGS and self.config is None:
            return f"no tile config for pattern {pattern.name!r}"
        cfg = self.config_for(pattern)
        for which, launch in (("forward", cfg.fwd), ("dq", cfg.dq), ("dkdv", cfg.dkdv)):
            for tile in (launch.block_m, launch.block_n):
                if tile < 16 or tile & (tile - 1):
                    return f"{which} tile {tile} for pattern block {pattern.block_size} is not a power of two >= 16"
            try:
                check_tiles(pattern, block_m=launch.block_m, block_n=launch.block_n)
            except ValueError as exc:
                return f"{which} tiles do not fit pattern block {pattern.block_size}: {exc}"
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
        if H not in HEAD_DIMS:
            raise ValueError(f"head dim {H} is not supported by the Triton kernel {HEAD_DIMS}")
        cfg = self.config_for(pattern)
        tables = self.tables_for(pattern, S, q_BNSH.device)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(H)
        return _TritonBlockSparse.apply(q_BNSH, k_BGSH, v_BGSH, tables, cfg, scale)


register_kernel(TritonBlockSparseKernel)
