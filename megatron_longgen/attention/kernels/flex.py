"""FlexAttention backend: the pattern's block mask built straight from block indices.

Legend: B = batch, N = query heads, G = KV heads, S = sequence, H = head dim, BM / BN = Flex's query / key
tile sizes, nQT / nKT = query / key tiles.

The `BlockMask` comes from `BlockMask.from_kv_blocks` fed with the tile tables of `tiles.py` (block-level
work only: [nQT, nKT] integers). Full tiles skip the mask function; partial tiles (diagonal, tiles that
only some 64-token row blocks keep, the ragged end) evaluate the pattern's token-level `mask_fn`. We never
call `create_block_mask`, whose uncompiled path evaluates the mask function on all S^2 pairs.

On CUDA `flex_attention` runs compiled (Triton templates, forward and backward). On CPU it runs eagerly,
which materialises [S, S] scores: `unavailable_reason` refuses CPU so that `auto` never picks it there;
tests instantiate it directly with `compiled=False`.
"""

from __future__ import annotations

import functools
import math

import torch

from megatron_longgen.attention.kernels.base import SparseAttentionKernel, register_kernel
from megatron_longgen.attention.kernels.tiles import check_tiles, classify_tiles
from megatron_longgen.attention.masks import SparsePattern


def _flex_module():
    from torch.nn.attention import flex_attention as flex_mod

    return flex_mod


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_module().flex_attention, dynamic=False)


def flex_block_mask(pattern: SparsePattern, seq_len: int, *, block_m: int, block_n: int, device):
    """A Flex `BlockMask` for `pattern` over `seq_len` tokens with (block_m, block_n) tiles."""
    flex_mod = _flex_module()
    bits, full = classify_tiles(pattern, seq_len, block_m=block_m, block_n=block_n, device=device)
    n_qt, n_kt = bits.shape
    partial = (bits != 0) & ~full

    def ordered(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = torch.arange(n_kt, device=device).expand_as(sel)
        key = torch.where(sel, cols, cols + n_kt)
        idx = key.sort(dim=1).values
        idx = torch.where(idx < n_kt, idx, idx - n_kt)  # dropped columns trail; their values are unused
        return sel.sum(dim=1).to(torch.int32)[None, None], idx.to(torch.int32)[None, None].contiguous()

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return flex_mod.BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(block_m, block_n),
        mask_mod=pattern.mask_fn(),
        seq_lengths=(seq_len, seq_len),
    )


class FlexSparseKernel(SparseAttentionKernel):
    """`torch.nn.attention.flex_attention` with a tile-table block mask; compiled on CUDA.

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
        self.block_m = block_m
        self.block_n = block_n
        self.compiled = compiled
        self.kernel_options = kernel_options
        self._masks: dict[tuple, object] = {}

    @classmethod
    def unavailable_reason(cls, *, device: torch.device, dtype: torch.dtype) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return "FlexAttention runs compiled only on CUDA (eager CPU mode builds S^2 scores)"
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"dtype {dtype} is not supported"
        try:
            _flex_module()
        except ImportError as exc:  # torch builds without flex_attention
            return f"torch.nn.attention.flex_attention is missing ({exc})"
        return None

    def _tiles(self, pattern: SparsePattern) -> tuple[int, int]:
        block_m = self.block_m or 128
        block_n = self.block_n or 128
        check_tiles(pattern, block_m=block_m, block_n=block_n)
        return block_m, block_n

    def block_mask(self, pattern: SparsePattern, seq_len: int, device) -> object:
        block_m, block_n = self._tiles(pattern)
        key = (pattern, seq_len, str(device), block_m, block_n)
        if key not in self._masks:
            self._masks[key] = flex_block_mask(
                pattern, seq_len, block_m=block_m, block_n=block_n, device=device
            )
        return self._masks[key]

    def __call__(self, q_BNSH, k_BGSH, v_BGSH, *, pattern: SparsePattern, softmax_scale=None):
        flex_mod = _flex_module()
        S = q_BNSH.shape[2]
        if k_BGSH.shape[2] != S:
            raise ValueError(
                f"sparse attention needs equal query and key lengths, got {S} and {k_BGSH.shape[2]}"
            )
        mask = self.block_mask(pattern, S, q_BNSH.device)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q_BNSH.shape[-1])
        compiled = self.compiled if self.compiled is not None else q_BNSH.is_cuda
        fn = _compiled_flex() if compiled else flex_mod.flex_attention
        kwargs = {"block_mask": mask, "scale": scale, "enable_gqa": k_BGSH.shape[1] != q_BNSH.shape[1]}
        if self.kernel_options:
            kwargs["kernel_options"] = dict(self.kernel_options)
        if hasattr(flex_mod, "AuxRequest"):
            out, aux = fn(q_BNSH, k_BGSH, v_BGSH, return_aux=flex_mod.AuxRequest(lse=True), **kwargs)
            lse = aux.lse
        else:
            out, lse = fn(q_BNSH, k_BGSH, v_BGSH, return_lse=True, **kwargs)
        return out, lse.float()


register_kernel(FlexSparseKernel, auto_rank=1)
