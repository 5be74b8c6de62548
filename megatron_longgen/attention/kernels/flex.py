"""FlexAttention: the one block-table -> `BlockMask` helper, the one Flex call, and the whole-sequence kernel.

Legend: B = batch, N = query heads, G = KV heads, S = query length, T = key length, H = head dim,
b = pattern block size, nQB / nKB = query / key blocks, BM / BN = Flex query / key tile (tokens),
nQT / nKT = query / key tiles, u = gcd(b, BM, BN) (the grid on which blocks and tiles both align).

`flex_block_mask` turns a block-level keep matrix ([nQB, nKB] booleans) and the tokens' positions into a
Flex `BlockMask` through `BlockMask.from_kv_blocks`: only block-level work ((S/u) x (T/u) booleans at
most, `tiles.tile_occupancy`), never [S, T]. A tile is *listed* when any of its block pairs is kept, and
*full* (Flex skips the mask function) when all are and every key position in it lies below every query
position in it; the other listed tiles evaluate the token-level mask function. We never call
`create_block_mask`, whose uncompiled path evaluates the mask function on all S x T pairs. Both users
build their mask here:

- `FlexSparseKernel` (whole causal sequence): keep = the pattern's block matrix, positions = arange, mask
  function = the pattern's arithmetic `mask_fn()`;
- `context_parallel/sparse_exchange.py` (one CP rank): keep = the exchange plan's key table, positions =
  the global positions of [local | fetched] tokens, mask function = a lookup of both.

Blocks need not nest with the tiles (u = gcd handles any pair) but must be multiples of 16 tokens, which
bounds the keep matrix by (S/16)^2 booleans (64 MiB at 128K).

`flex_attention_lse` is the one call into Flex, on the `return_aux=AuxRequest(lse=True)` API (torch >= 2.9;
the older `return_lse` flag is deprecated there). On CUDA it runs compiled (Triton templates, forward
and backward); on CPU eagerly, which materialises [S, T] scores: `flex_unavailable_reason` refuses CPU so
that `auto` never picks it there; tests call the functions directly with `compiled=False`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from megatron_longgen.attention.kernels.base import SparseAttentionKernel, register_kernel
from megatron_longgen.attention.kernels.tiles import tile_occupancy
from megatron_longgen.attention.masks import SparsePattern, block_mask_matrix, num_blocks

FLEX_TILE = 128
"""Default Flex tile (tokens, both sides): the measured choice on H200 (DESIGN.md; 128 x 64 tiles failed to
compile the backward on torch 2.11)."""
FLEX_MIN_BLOCK = 16
"""Pattern blocks must be multiples of this (the keep matrix stays at most (S/16)^2 booleans)."""


def _flex_module():
    from torch.nn.attention import flex_attention as flex_mod

    return flex_mod


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_module().flex_attention, dynamic=False)


def flex_unavailable_reason(
    *, device: torch.device, dtype: torch.dtype, pattern: SparsePattern | None = None
) -> str | None:
    """None when compiled FlexAttention can run `pattern` on `device` with `dtype`, else a one-line reason."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FlexAttention runs compiled only on CUDA, got {device.type} (eager mode builds S^2 scores)"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype} is not supported (bf16, fp16, fp32)"
    try:
        flex_mod = _flex_module()
    except ImportError as exc:  # torch builds without flex_attention
        return f"torch.nn.attention.flex_attention is missing ({exc})"
    if not hasattr(flex_mod, "AuxRequest"):
        return f"torch {torch.__version__} lacks flex_attention's AuxRequest (needs torch >= 2.9)"
    if pattern is not None and pattern.block_size % FLEX_MIN_BLOCK:
        return f"pattern block {pattern.block_size} is not a multiple of {FLEX_MIN_BLOCK} tokens"
    return None


def _kv_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nQT, nKT] selected tiles -> Flex's (num [1, 1, nQT], indices [1, 1, nQT, nKT]), selected first."""
    n_kt = sel.shape[1]
    cols = torch.arange(n_kt, device=sel.device).expand_as(sel)
    idx = torch.where(sel, cols, cols + n_kt).sort(dim=1).values
    idx = torch.where(idx < n_kt, idx, idx - n_kt)  # unselected columns trail; Flex never reads them
    return sel.sum(dim=1).to(torch.int32)[None, None], idx.to(torch.int32)[None, None].contiguous()


def flex_block_mask(
    keep_QK: torch.Tensor,
    *,
    block_size: int,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    tile: tuple[int, int] = (FLEX_TILE, FLEX_TILE),
    mask_mod: Callable | None = None,
):
    """A Flex `BlockMask` over S = len(q_positions) queries and T = len(k_positions) keys.

    Args:
        keep_QK: [ceil(S/b), ceil(T/b)] bool, query block i keeps key block j (blocks of `block_size`
            tokens of the query / key tensors, in tensor order).
        q_positions, k_positions: int64 [S] / [T] positions for the causal rule (key visible when its
            position <= the query's); the device of the mask.
        tile: Flex (BM, BN) tile sizes.
        mask_mod: the token-level mask function of listed, non-full tiles; None = a lookup of `keep_QK`
            and the positions (`keep[q // b, k // b] & (k_pos[k] <= q_pos[q])`).

    Returns a BlockMask with `seq_lengths=(S, T)`; its tables are [1, 1, nQT, nKT] int32.
    """
    flex_mod = _flex_module()
    device = q_positions.device
    S, T = q_positions.numel(), k_positions.numel()
    b = block_size
    keep = keep_QK.to(device)
    listed, full = tile_occupancy(
        keep, block_size=b, q_positions=q_positions, k_positions=k_positions, tile=tile
    )
    if mask_mod is None:
        q_pos, k_pos = q_positions, k_positions

        def mask_mod(batch, head, q_idx, kv_idx):
            # Flex evaluates whole tiles: indices past S / T are clamped here (no out-of-range load) and
            # masked by Flex itself.
            qi, ki = q_idx.clamp(max=S - 1), kv_idx.clamp(max=T - 1)
            return keep[qi // b, ki // b] & (k_pos[ki] <= q_pos[qi])

        mask_mod.__name__ = f"block_table_b{b}"
    kv_num, kv_idx = _kv_lists(listed & ~full)
    full_num, full_idx = _kv_lists(full)
    return flex_mod.BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=mask_mod, seq_lengths=(S, T)
    )


def pattern_block_mask(pattern: SparsePattern, seq_len: int, *, tile: tuple[int, int], device):
    """`flex_block_mask` of a whole causal sequence under `pattern` (the pattern's own mask function)."""
    nb = num_blocks(seq_len, pattern.block_size)
    pos = torch.arange(seq_len, device=device)
    return flex_block_mask(
        block_mask_matrix(pattern, nb, device=device),
        block_size=pattern.block_size,
        q_positions=pos,
        k_positions=pos,
        tile=tile,
        mask_mod=pattern.mask_fn(),
    )


def flex_attention_lse(
    q_BNSH: torch.Tensor,
    k_BGTH: torch.Tensor,
    v_BGTH: torch.Tensor,
    *,
    block_mask,
    softmax_scale: float | None = None,
    compiled: bool | None = None,
    kernel_options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`flex_attention` with its log-sum-exp: (out_BNSH in the input dtype, lse_BNS fp32), both
    differentiable. `compiled` None = compiled on CUDA, eager elsewhere."""
    flex_mod = _flex_module()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q_BNSH.shape[-1])
    use_compiled = q_BNSH.is_cuda if compiled is None else compiled
    fn = _compiled_flex() if use_compiled else flex_mod.flex_attention
    kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": k_BGTH.shape[1] != q_BNSH.shape[1]}
    if kernel_options:
        kwargs["kernel_options"] = dict(kernel_options)
    out, aux = fn(q_BNSH, k_BGTH, v_BGTH, return_aux=flex_mod.AuxRequest(lse=True), **kwargs)
    return out, aux.lse.float()


class FlexSparseKernel(SparseAttentionKernel):
    """`torch.nn.attention.flex_attention` with a block mask built from the pattern; compiled on CUDA.

    Args:
        block_m, block_n: Flex tile sizes (BLOCK_SIZE of the block mask); None = 128 x 128.
        compiled: run through `torch.compile` (CUDA); False runs eagerly (CPU tests, N^2 memory).
        kernel_options: passed to `flex_attention` (e.g. backward tile sizes).
    """

    name = "flex"

    def __init__(
        self,
        *,
        block_m: int | None = None,
        block_n: int | None = None,
        compiled: bool | None = None,
        kernel_options: dict | None = None,
    ):
        self.tile = (block_m or FLEX_TILE, block_n or FLEX_TILE)
        self.compiled = compiled
        self.kernel_options = kernel_options
        self._masks: dict[tuple, object] = {}

    @classmethod
    def unavailable_reason(cls, *, device, dtype, pattern=None, head_dim=None) -> str | None:
        return flex_unavailable_reason(device=device, dtype=dtype, pattern=pattern)

    def block_mask(self, pattern: SparsePattern, seq_len: int, device) -> object:
        key = (pattern, seq_len, str(device), self.tile)
        if key not in self._masks:
            self._masks[key] = pattern_block_mask(pattern, seq_len, tile=self.tile, device=device)
        return self._masks[key]

    def __call__(self, q_BNSH, k_BGSH, v_BGSH, *, pattern: SparsePattern, softmax_scale=None):
        S = q_BNSH.shape[2]
        if k_BGSH.shape[2] != S:
            raise ValueError(
                f"sparse attention needs equal query and key lengths, got {S} and {k_BGSH.shape[2]}"
            )
        return flex_attention_lse(
            q_BNSH,
            k_BGSH,
            v_BGSH,
            block_mask=self.block_mask(pattern, S, q_BNSH.device),
            softmax_scale=softmax_scale,
            compiled=self.compiled,
            kernel_options=self.kernel_options,
        )


register_kernel(FlexSparseKernel)
