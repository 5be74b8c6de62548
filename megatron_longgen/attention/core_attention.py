"""Megatron-Core `core_attention` modules: one for LongGen's sparse layers, one for full layers.

Legend: s = sequence (local), b = batch, n = query heads on this TP rank, g = KV heads on this TP rank,
h = head dim (Megatron: `kv_channels`).

Megatron's `SelfAttention` computes Q/K/V, applies RoPE with the tokens' absolute positions, and calls
`core_attention(query[s, b, n, h], key[s, b, g, h], value[s, b, g, h], attention_mask, ...)`, expecting
`[s, b, n*h]` back. Both modules below honour that contract; GQA is handled inside the kernels (KV head j
serves query heads j*n/g .. (j+1)*n/g-1, Megatron's order), so K/V are never repeated in memory.

- `SparseCoreAttention` runs the layer's static sparse pattern through the kernel chosen once at
  construction (`attention/kernels`: the fastest available on GPU, the PyTorch block kernel on CPU).
- `FullCoreAttention` is dense causal attention through `torch.nn.functional.scaled_dot_product_attention`
  (cuDNN / flash backends on GPU: no [s, s] tensor). When Transformer Engine is installed, the layer specs
  use TE's `TEDotProductAttention` for full layers instead.

Context parallelism is handled by the modules in `context_parallel/`, not here; these modules refuse a CP
size above 1 with a clear error instead of silently attending within a shard.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.attention.kernels import select_sparse_kernel
from megatron_longgen.attention.masks import SparsePattern
from megatron_longgen.config import SparseAttentionConfig

_WARNED_MASK = False


def _check_common(config: TransformerConfig, attn_mask_type: AttnMaskType, kind: str, pg_collection) -> None:
    if attn_mask_type != AttnMaskType.causal:
        raise ValueError(f"{kind} attention supports attn_mask_type=causal only, got {attn_mask_type}")
    cp = pg_collection.cp.size() if pg_collection is not None and hasattr(pg_collection, "cp") else 1
    if cp > 1 or config.context_parallel_size > 1:
        raise ValueError(
            f"{kind} core attention got context_parallel_size {max(cp, config.context_parallel_size)}; "
            "build_block_spec picks context_parallel/core_attention.py modules when context_parallel_size > 1"
        )


def _warn_ignored_mask(attention_mask) -> None:
    global _WARNED_MASK
    if attention_mask is not None and not _WARNED_MASK:
        _WARNED_MASK = True
        warnings.warn(
            "attention_mask is ignored: LongGen layers are causal by construction (pass attention_mask=None)",
            stacklevel=3,
        )


def to_bnsh(x_sbnh: torch.Tensor) -> torch.Tensor:
    return x_sbnh.permute(1, 2, 0, 3)


def from_bnsh(out_bnsh: torch.Tensor) -> torch.Tensor:
    b, n, s, h = out_bnsh.shape
    return out_bnsh.permute(2, 0, 1, 3).reshape(s, b, n * h)


class SparseCoreAttention(MegatronModule):
    """Static block-sparse causal attention (sink + window, or block-strided) for `S` layers.

    Constructed by Megatron from a `ModuleSpec` whose params carry `sparse` (a SparseAttentionConfig).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        sparse: SparseAttentionConfig,
    ):
        super().__init__(config=config)
        _check_common(config, attn_mask_type, "sparse", pg_collection)
        from megatron_longgen.attention.masks import pattern_from_config

        self.layer_number = layer_number
        self.sparse = sparse
        self.pattern: SparsePattern = pattern_from_config(sparse)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"sparse attention has no dropout; got attention_dropout {dropout} (set it to 0)")
        self._kernel = None
        self._kernel_key = None

    def kernel_for(self, tensor: torch.Tensor):
        """The kernel for this device/dtype, chosen (and logged) once per combination."""
        key = (tensor.device.type, tensor.dtype)
        if self._kernel_key != key:
            self._kernel = select_sparse_kernel(self.sparse.backend, device=tensor.device, dtype=tensor.dtype)
            self._kernel_key = key
        return self._kernel

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("sparse attention supports neither packed_seq_params nor attention_bias")
        _warn_ignored_mask(attention_mask)
        kernel = self.kernel_for(query)
        out, _ = kernel(
            to_bnsh(query), to_bnsh(key), to_bnsh(value), pattern=self.pattern, softmax_scale=self.softmax_scale
        )
        return from_bnsh(out)


class FullCoreAttention(MegatronModule):
    """Dense causal attention through torch SDPA (flash / cuDNN / memory-efficient backends on GPU)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        _check_common(config, attn_mask_type, "full", pg_collection)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("full attention supports neither packed_seq_params nor attention_bias")
        _warn_ignored_mask(attention_mask)
        q, k, v = to_bnsh(query), to_bnsh(key), to_bnsh(value)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return from_bnsh(out)
