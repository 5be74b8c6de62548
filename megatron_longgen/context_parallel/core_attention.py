"""Megatron-Core `core_attention` modules for context parallelism (CP > 1).

Legend: s = local sequence (global / R), b = batch, n = query heads on this TP rank, g = KV heads on this
TP rank (Megatron: `num_query_groups / tp`), h = head dim (`kv_channels`), R = CP size.

Megatron's `SelfAttention` hands `core_attention` this rank's zig-zag shard (`sharding.py`; the data path
splits batches with `shard_batch_for_cp`, and GPTModel's RoPE already rotated each token with its global
position through `get_pos_emb_on_this_cp_rank`, which assumes the same layout) as q [s, b, n, h],
k/v [s, b, g, h], and expects [s, b, n*h] back. The modules take the CP group from the `pg_collection`
Megatron passes to core-attention constructors (`pg_collection.cp`) and keep it; `forward` reads no
global state.

- `ContextParallelFullAttention`: zig-zag ring attention (`ring_attention.py`), step kernel chosen once
  per device/dtype (`step_kernel="auto"`: cuDNN / flash on GPU, fp32 math on CPU).
- `ContextParallelSparseAttention`: the layer's static sparse pattern with the KV-reduced block exchange
  (`sparse_exchange.py`). `SparseAttentionConfig.backend` maps to the exchange's kernels: `torch` ->
  the PyTorch block kernel, `flex` -> FlexAttention, anything else (`auto`, and the whole-sequence
  kernels `triton` / `cudnn_bsa` / `cudnn_bsa_fwd`, which have no CP form) -> `auto` (Flex on CUDA, else
  torch).
"""

from __future__ import annotations

import math
import warnings

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.attention.core_attention import from_bnsh, to_bnsh
from megatron_longgen.attention.masks import SparsePattern, pattern_from_config
from megatron_longgen.config import SparseAttentionConfig
from megatron_longgen.context_parallel.ring_attention import ring_attention
from megatron_longgen.context_parallel.sparse_exchange import sparse_cp_attention
from megatron_longgen.context_parallel.step_kernels import DenseStepKernel, select_step_kernel


def _cp_group_from(config: TransformerConfig, pg_collection, kind: str):
    if pg_collection is None or getattr(pg_collection, "cp", None) is None:
        raise ValueError(f"context-parallel {kind} attention needs pg_collection.cp (Megatron passes it)")
    group = pg_collection.cp
    if group.size() != config.context_parallel_size:
        raise ValueError(
            f"context-parallel {kind} attention: pg_collection.cp has {group.size()} ranks but "
            f"config.context_parallel_size is {config.context_parallel_size}"
        )
    return group


def _check(attn_mask_type: AttnMaskType, attention_dropout: float, kind: str) -> None:
    if attn_mask_type != AttnMaskType.causal:
        raise ValueError(
            f"context-parallel {kind} attention supports attn_mask_type=causal only, got {attn_mask_type}"
        )
    if attention_dropout:
        raise ValueError(
            f"context-parallel {kind} attention has no dropout; got attention_dropout {attention_dropout}"
        )


def _check_forward(attention_mask, attention_bias, packed_seq_params, kind: str) -> None:
    if packed_seq_params is not None or attention_bias is not None:
        raise ValueError(
            f"context-parallel {kind} attention supports neither packed_seq_params nor attention_bias"
        )
    if attention_mask is not None:
        raise ValueError(
            f"context-parallel {kind} attention is causal by construction: pass attention_mask=None"
        )


_WARNED_BACKENDS: set[str] = set()


def _warn_backend_once(backend: str) -> None:
    if backend not in _WARNED_BACKENDS:
        _WARNED_BACKENDS.add(backend)
        warnings.warn(
            f"sparse backend {backend!r} has no context-parallel form; CP sparse layers use 'auto' "
            "(FlexAttention on CUDA, the PyTorch block kernel elsewhere)",
            stacklevel=3,
        )


class ContextParallelFullAttention(MegatronModule):
    """Dense causal attention over the CP group by zig-zag ring attention (full `F` layers, CP > 1)."""

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
        step_kernel: str = "auto",
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        _check(attn_mask_type, dropout, "full")
        self.cp_group = _cp_group_from(config, pg_collection, "full")
        self.layer_number = layer_number
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.step_kernel_name = step_kernel
        self._kernels: dict[tuple, DenseStepKernel] = {}

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
        _check_forward(attention_mask, attention_bias, packed_seq_params, "full")
        key_ = (query.device.type, query.dtype)
        if key_ not in self._kernels:
            self._kernels[key_] = select_step_kernel(
                self.step_kernel_name, device=query.device, dtype=query.dtype
            )
        out, _ = ring_attention(
            to_bnsh(query),
            to_bnsh(key),
            to_bnsh(value),
            cp_group=self.cp_group,
            softmax_scale=self.softmax_scale,
            kernel=self._kernels[key_],
        )
        return from_bnsh(out)


class ContextParallelSparseAttention(MegatronModule):
    """Static sparse causal attention over the CP group with the KV-reduced exchange (`S` layers, CP > 1)."""

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
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        _check(attn_mask_type, dropout, "sparse")
        self.cp_group = _cp_group_from(config, pg_collection, "sparse")
        self.layer_number = layer_number
        self.sparse = sparse
        self.pattern: SparsePattern = pattern_from_config(sparse)
        self.kernel = sparse.backend if sparse.backend in ("torch", "flex") else "auto"
        if sparse.backend not in ("auto", "torch", "flex"):
            _warn_backend_once(sparse.backend)
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )

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
        _check_forward(attention_mask, attention_bias, packed_seq_params, "sparse")
        out, _ = sparse_cp_attention(
            to_bnsh(query),
            to_bnsh(key),
            to_bnsh(value),
            pattern=self.pattern,
            cp_group=self.cp_group,
            softmax_scale=self.softmax_scale,
            kernel=self.kernel,
        )
        return from_bnsh(out)
