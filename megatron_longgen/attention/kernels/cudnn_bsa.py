"""cuDNN block-sparse attention for the full tiles of a pattern, the Triton kernel for the rest.

Legend: B = batch, N = query heads, G = KV heads, S = sequence, H = head dim, T = a dense tile of the
cuDNN kernel (64 or 128 tokens), nQT = S / T.

cuDNN frontend (`pip install nvidia-cudnn-frontend[cutedsl]`, >= 1.32) ships FA3-derived block-sparse
attention kernels for Hopper (CuTe DSL, compiled on first use). They are non-causal: every listed
(query tile, key tile) pair is computed in full. A LongGen pattern splits into

- *full tiles*: key tiles that every query row of the query tile keeps, strictly below the diagonal
  (for sink_window at T = 64: the sink and 31 window blocks of each query block, 32 of its 33);
- *the remainder*: the causal diagonal, and (for T = 128) tiles that only one of the two 64-token
  query blocks keeps.

    forward:  cuDNN BSA (T = 64)            -> (out, lse) over the full tiles
              Triton, starting from them     -> (out, lse) over all keys (online softmax, in place)
    backward: cuDNN BSA (T = 128)           -> dq, dk, dv of the full tiles, from the final out / lse
              Triton (remainder)             -> adds its share into the same dq, dk, dv

No merge pass is needed: a partial backward only needs the final (out, lse). The backward is the Triton
kernel's for the whole pattern (same results, no cuDNN workspace) where cuDNN's cannot run it or loses:
GQA (cuDNN's block-sparse backward is MHA-only), an incoming LSE gradient (it takes none), or
`backward="triton"` (the `cudnn_bsa_fwd` backend). Patterns not in `CUDNN_PATTERNS` (block_strided, where
cuDNN measured no faster) run on the Triton kernel altogether.

Memory: cuDNN's backward allocates fp32 dQ and dK/dV accumulators: +151% of the Q/K/V/O bytes at 128K
(32 x 128 MHA, measured), above the cuDNN dense kernel's +50%. `bwd_heads_per_call` bounds them by
running cuDNN on a few heads at a time, at a measured cost of ~3.4 ms per extra call (128K: 16 heads per
call +75%, 43.9 ms; 8: +38%, 49.7 ms vs 40.7 ms). `cudnn_bsa_fwd` keeps the Triton kernel's +0.4%.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass

import torch

from megatron_longgen.attention.kernels.base import SparseAttentionKernel, register_kernel
from megatron_longgen.attention.kernels.tiles import TileTables
from megatron_longgen.attention.kernels.triton_block_sparse import (
    LaunchConfig,
    TritonBlockSparseKernel,
    TritonConfig,
    triton_backward,
    triton_forward,
)
from megatron_longgen.attention.masks import SparsePattern, mask_matrix_to_table
from megatron_longgen.utils.optional import has_cudnn_bsa, has_triton

logger = logging.getLogger(__name__)

FORWARD_TILE = 64
# Patterns cuDNN takes, with its backward tile and whether one k2q bucket holds all query tiles. Measured
# on an H200, 32 x 128 MHA (benchmarks/notes_attention.md): for sink_window, 128-token backward tiles run
# at ~1.0x the dense backward rate (64-token ones ~0.7x) and a single bucket was fastest; fwd+bwd 41 ms
# vs 50.1 ms for the Triton kernel at 128K. block_strided stays on the Triton kernel: its stride blocks
# are single 64-token blocks, and cuDNN's forward (+ the Triton backward) measured slower at 16K-64K
# (16K: 2.16 vs 1.74 ms fwd+bwd) and within 1-4% at 128K-256K; cuDNN's 64-token backward lost too.
CUDNN_PATTERNS: dict[str, tuple[int, bool]] = {"sink_window": (128, True)}
# Triton launch configs for the remainder (diagonal blocks, window edges): different work from the whole
# pattern's, so tuned separately (`tools/bench_attention.py --sweep --backends cudnn_bsa`).
REMAINDER_CONFIG = TritonConfig(
    fwd=LaunchConfig(128, 64, 8, 3), dq=LaunchConfig(128, 64, 8, 2), dkdv=LaunchConfig(32, 64, 4, 3)
)


@dataclass(frozen=True)
class TileRemainder:
    """`base` minus the block pairs the dense-tile kernel computes; quacks like a pattern for the tile tables
    (`block_size`, `block_rule`, `name`, `max_kv_blocks`), so the Triton kernel runs exactly the rest.

    The dense-tile kernel takes (a) `tile` x `tile` squares strictly below the diagonal that the pattern
    keeps whole, and (b) when the sink ends inside a tile (1 sink block in 128-token tiles), that tile's
    sink prefix for every later query tile: cuDNN's `block_sizes` cuts the tile to its first
    `sink_prefix_tokens` keys for all query tiles, so the tile is never also taken whole. Without (b) the
    sink column (seen by every query) lands in the remainder as one long serial Triton program.
    """

    base: SparsePattern
    tile: int

    def __post_init__(self):
        if self.tile % self.base.block_size:
            raise ValueError(
                f"tile {self.tile} must be a multiple of the pattern block {self.base.block_size}"
            )

    @property
    def block_size(self) -> int:
        return self.base.block_size

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def blocks_per_tile(self) -> int:
        return self.tile // self.base.block_size

    @property
    def sink_tile(self) -> int | None:
        """Key tile in which the sink ends part-way (None: the sink fills whole tiles, or there is none)."""
        sink = getattr(self.base, "num_sink_blocks", 0)
        return sink // self.blocks_per_tile if sink % self.blocks_per_tile else None

    @property
    def sink_prefix_tokens(self) -> int:
        sink = getattr(self.base, "num_sink_blocks", 0)
        return (sink % self.blocks_per_tile) * self.base.block_size

    def max_kv_blocks(self, num_kv_blocks: int) -> int:
        return self.base.max_kv_blocks(num_kv_blocks)

    def covered(self, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        """Is block pair (qb, kb) computed by the dense-tile kernel."""
        r = self.blocks_per_tile
        qt, kt = qb // r, kb // r
        full = kt < qt
        for i in range(r):
            for j in range(r):
                full = full & self.base.block_rule(qt * r + i, kt * r + j)
        if self.sink_tile is None:
            return full
        in_prefix = (kt == self.sink_tile) & (kb - kt * r < self.sink_prefix_tokens // self.base.block_size)
        return (full & (kt != self.sink_tile)) | (in_prefix & (qt > self.sink_tile))

    def block_rule(self, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        return self.base.block_rule(qb, kb) & ~self.covered(qb, kb)


@dataclass(frozen=True)
class TileIndex:
    """cuDNN BSA metadata of the dense-tile share: index [B, N, nQT, W] int32 key tiles (unused slots 0),
    counts [B, N, nQT] int32, block_sizes [nKT] int32 valid keys per key tile (None: all whole)."""

    tile: int
    index: torch.Tensor
    counts: torch.Tensor
    block_sizes: torch.Tensor | None


def full_tile_index(
    pattern: SparsePattern, seq_len: int, tile: int, *, batch: int, heads: int, device
) -> TileIndex:
    """The dense-tile share of `pattern` (see `TileRemainder`) as cuDNN BSA metadata.

    Size: B * N * nQT * W * 4 bytes (8 MiB for 32 heads at 128K with 64-token tiles), built once per
    (pattern, length) and cached.
    """
    if seq_len % tile:
        raise ValueError(f"sequence length {seq_len} must be a multiple of the cuDNN tile {tile}")
    n_tiles = seq_len // tile
    split = TileRemainder(pattern, tile)
    r = split.blocks_per_tile
    tiles = torch.arange(n_tiles, device=device)
    # A tile pair is listed if any of its block pairs is covered (only the sink tile is ever listed partly).
    listed = torch.zeros(n_tiles, n_tiles, dtype=torch.bool, device=device)
    for i in range(r):
        for j in range(r):
            listed |= split.covered(tiles[:, None] * r + i, tiles[None, :] * r + j)
    table = mask_matrix_to_table(listed).clamp_min(0).to(torch.int32)
    counts = listed.sum(dim=1).to(torch.int32)
    sizes = None
    if split.sink_tile is not None and split.sink_tile < n_tiles:
        sizes = torch.full((n_tiles,), tile, dtype=torch.int32, device=device)
        sizes[split.sink_tile] = split.sink_prefix_tokens
    return TileIndex(
        tile=tile,
        index=table[None, None].expand(batch, heads, *table.shape).contiguous(),
        counts=counts[None, None].expand(batch, heads, n_tiles).contiguous(),
        block_sizes=sizes,
    )


@functools.cache
def _bsa():
    from cudnn.block_sparse_attention import block_sparse_attention_backward, block_sparse_attention_forward

    return block_sparse_attention_forward, block_sparse_attention_backward


@dataclass(frozen=True)
class _Plan:
    """Everything one (pattern, shape) needs, built once."""

    fwd: TileIndex
    fwd_rest: TileTables  # Triton forward table of the remainder of the forward split
    bwd: TileIndex | None  # None: Triton backward for the whole pattern
    bwd_bucket: int | None
    bwd_heads_per_call: int
    bwd_rest: tuple[TileTables, TileTables] | None  # Triton (dQ, dK/dV) tables of the backward remainder
    full_bwd: tuple[TileTables, TileTables]  # Triton (dQ, dK/dV) tables of the whole pattern
    config: TritonConfig  # launches of the whole-pattern tables
    rest_config: TritonConfig  # launches of the remainder tables


class _CudnnBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        bsa_fwd, _ = _bsa()
        res = bsa_fwd(
            q, k, v, plan.fwd.index, q2k_block_nums=plan.fwd.counts, block_sizes=plan.fwd.block_sizes,
            allow_empty_block_nums=True, softmax_scale=scale, layout="bhsd", sparse_block_size=plan.fwd.tile,
        )  # fmt: skip
        out, lse = triton_forward(
            q, k, v, plan.fwd_rest, plan.rest_config.fwd, scale, init=(res["o_tensor"], res["lse_tensor"])
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        if d_out is None:
            d_out = torch.zeros_like(out)
        if plan.bwd is not None and d_lse is None:
            _, bsa_bwd = _bsa()
            d_out = d_out if d_out.stride(-1) == 1 else d_out.contiguous()
            grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
            # cuDNN's fp32 accumulators scale with the heads of one call: chunking the heads bounds them.
            step = plan.bwd_heads_per_call
            for h in range(0, q.shape[1], step):
                sl = slice(h, h + step)
                bsa_bwd(
                    d_out[:, sl], q[:, sl], k[:, sl], v[:, sl], out[:, sl], lse[:, sl].contiguous(),
                    plan.bwd.index[:, sl].contiguous(), q2k_block_nums=plan.bwd.counts[:, sl].contiguous(),
                    block_sizes=plan.bwd.block_sizes, softmax_scale=ctx.scale, sparse_block_size=plan.bwd.tile,
                    layout="bhsd", bucket_size_blocks=plan.bwd_bucket,
                    dq_tensor=grads[0][:, sl], dk_tensor=grads[1][:, sl], dv_tensor=grads[2][:, sl],
                )  # fmt: skip
            t_dq, t_kv = plan.bwd_rest
            dq, dk, dv = triton_backward(
                q, k, v, out, lse, d_out, None, t_dq, t_kv, plan.rest_config, ctx.scale, accumulate=grads
            )
        else:
            t_dq, t_kv = plan.full_bwd
            dq, dk, dv = triton_backward(q, k, v, out, lse, d_out, d_lse, t_dq, t_kv, plan.config, ctx.scale)
        return dq, dk, dv, None, None


class CudnnBlockSparseKernel(SparseAttentionKernel):
    """cuDNN block-sparse attention (Hopper, bf16, head dim 128) + the Triton kernel for the remainder.

    Args:
        backward: "cudnn" (cuDNN for the full tiles where it can, fastest, with its fp32 workspace) or
            "triton" (the Triton backward for the whole pattern: <1% extra memory).
        bwd_heads_per_call: run cuDNN's backward on this many heads at a time (bounds its workspace, costs
            time; None = all heads in one call).
        remainder_config: Triton launches for the remainder (None = `REMAINDER_CONFIG`).

    `attention/backends.py` refuses it for patterns and head dims it cannot take (`pattern_reason`). Called
    directly, shapes it does not take (head dim other than 128, a length that is not a multiple of the
    tiles, pattern blocks other than 64 tokens) run on the Triton kernel, with a warning the first time.
    """

    name = "cudnn_bsa"

    def __init__(
        self,
        *,
        backward: str = "cudnn",
        bwd_heads_per_call: int | None = None,
        remainder_config: TritonConfig | None = None,
    ):
        if backward not in ("cudnn", "triton"):
            raise ValueError(f"backward must be 'cudnn' or 'triton', got {backward!r}")
        self.backward = backward
        self.bwd_heads_per_call = bwd_heads_per_call
        self.triton = TritonBlockSparseKernel()
        self.rest_triton = TritonBlockSparseKernel(config=remainder_config or REMAINDER_CONFIG)
        self._plans: dict[tuple, _Plan] = {}
        self._warned: set[str] = set()

    @classmethod
    def unavailable_reason(cls, *, device, dtype, pattern=None, head_dim=None) -> str | None:
        device = torch.device(device)
        if not has_triton():
            return "triton is not installed (the remainder of each pattern runs on the Triton kernel)"
        if not has_cudnn_bsa():
            return "cuDNN frontend block-sparse attention is not installed (pip install 'nvidia-cudnn-frontend[cutedsl]>=1.32')"
        if device.type != "cuda":
            return "needs CUDA"
        if dtype != torch.bfloat16:
            return f"dtype {dtype} is not supported (cuDNN's block-sparse backward is bf16 only)"
        if pattern is not None:
            reason = cls.pattern_reason(pattern, head_dim=head_dim)
            if reason is not None:
                return reason
        if torch.cuda.get_device_capability(device)[0] != 9:
            return "measured and enabled on Hopper (SM90) only"
        return None

    @classmethod
    def pattern_reason(cls, pattern: SparsePattern, *, head_dim: int | None = None) -> str | None:
        """None when this backend accepts `pattern` (and `head_dim`, None = unknown), else why not. Patterns
        outside `CUDNN_PATTERNS` are accepted when the Triton kernel takes them (they run on it by design);
        the others need cuDNN's 64-token blocks and head dim 128."""
        reason = TritonBlockSparseKernel().pattern_reason(pattern)
        if reason is not None or pattern.name not in CUDNN_PATTERNS:
            return reason
        if pattern.block_size != FORWARD_TILE:
            return f"pattern block {pattern.block_size} (cuDNN's tiles need {FORWARD_TILE}-token blocks)"
        if head_dim is not None and head_dim != 128:
            return f"head dim {head_dim} (cuDNN's block-sparse backward needs 128)"
        return None

    def _unsupported(self, pattern, S: int, H: int) -> str | None:
        bwd_tile = CUDNN_PATTERNS[pattern.name][0]
        if pattern.block_size != FORWARD_TILE:
            return f"pattern block {pattern.block_size} (cuDNN's tiles need 64-token blocks)"
        if H != 128:
            return f"head dim {H} (cuDNN's block-sparse backward needs 128)"
        if S % bwd_tile:
            return f"length {S} is not a multiple of the cuDNN tile {bwd_tile}"
        return None

    def _plan(self, pattern, B: int, N: int, G: int, S: int, device) -> _Plan:
        use_cudnn_bwd = self.backward == "cudnn" and N == G
        key = (pattern, B, N, S, str(device), use_cudnn_bwd, self.bwd_heads_per_call)
        if key not in self._plans:
            config = self.triton.config_for(pattern)
            fwd = full_tile_index(pattern, S, FORWARD_TILE, batch=B, heads=N, device=device)
            fwd_rest = self.rest_triton.tables_for(TileRemainder(pattern, FORWARD_TILE), S, device)[0]
            _, full_dq, full_kv = self.triton.tables_for(pattern, S, device)
            bwd = bwd_bucket = bwd_rest = None
            if use_cudnn_bwd:
                bwd_tile, whole_rows = CUDNN_PATTERNS[pattern.name]
                bwd = full_tile_index(pattern, S, bwd_tile, batch=B, heads=N, device=device)
                bwd_bucket = S // bwd_tile if whole_rows else None
                bwd_rest = self.rest_triton.tables_for(TileRemainder(pattern, bwd_tile), S, device)[1:]
            self._plans[key] = _Plan(
                fwd=fwd, fwd_rest=fwd_rest, bwd=bwd, bwd_bucket=bwd_bucket, bwd_rest=bwd_rest,
                full_bwd=(full_dq, full_kv), config=config, rest_config=self.rest_triton.config_for(pattern),
                bwd_heads_per_call=self.bwd_heads_per_call or N,
            )  # fmt: skip
        return self._plans[key]

    def __call__(self, q_BNSH, k_BGSH, v_BGSH, *, pattern: SparsePattern, softmax_scale=None):
        B, N, S, H = q_BNSH.shape
        G = k_BGSH.shape[1]
        if k_BGSH.shape[2] != S or v_BGSH.shape[2] != S:
            raise ValueError(
                f"sparse attention needs equal query and key lengths, got {S} and {k_BGSH.shape[2]}"
            )
        if N % G:
            raise ValueError(f"query heads {N} must be a multiple of kv heads {G}")
        if pattern.name not in CUDNN_PATTERNS:  # by design (measured), not a fallback: logged, no warning
            if pattern.name not in self._warned:
                self._warned.add(pattern.name)
                logger.info(
                    "cudnn_bsa: %s runs on the Triton kernel (cuDNN measured no faster)", pattern.name
                )
            return self.triton(q_BNSH, k_BGSH, v_BGSH, pattern=pattern, softmax_scale=softmax_scale)
        reason = self._unsupported(pattern, S, H)
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"cudnn_bsa: {reason}; using the Triton kernel for this shape", stacklevel=2)
            return self.triton(q_BNSH, k_BGSH, v_BGSH, pattern=pattern, softmax_scale=softmax_scale)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BNSH, k_BGSH, v_BGSH))
        plan = self._plan(pattern, B, N, G, S, q.device)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(H)
        return _CudnnBlockSparse.apply(q, k, v, plan, scale)


class CudnnBlockSparseForwardKernel(CudnnBlockSparseKernel):
    """cuDNN block-sparse forward, Triton backward: the memory-lean variant (no cuDNN workspace)."""

    name = "cudnn_bsa_fwd"

    def __init__(self):
        super().__init__(backward="triton")


register_kernel(CudnnBlockSparseKernel)
register_kernel(CudnnBlockSparseForwardKernel)
