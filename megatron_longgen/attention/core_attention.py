"""The Megatron-Core `core_attention` module of every LongGen layer: sparse or full, with or without CP.

Legend: s = sequence on this rank (global / R), b = batch, n = query heads on this TP rank, g = KV heads on
this TP rank (Megatron: `num_query_groups / tp`), h = head dim (Megatron: `kv_channels`), R = CP size;
B, N, G, S, H: the same in the kernels' [b, n, s, h] layout.

Megatron's `SelfAttention` computes Q/K/V, applies RoPE with each token's global position, and calls
`core_attention(query[s, b, n, h], key[s, b, g, h], value[s, b, g, h], attention_mask, ...)`, expecting
`[s, b, n*h]` back. `LongGenCoreAttention` owns that contract once for every layer: the constructor's
signature and checks, the softmax scale default (1/sqrt(kv_channels)), the input checks of `forward`, and
the [s, b, n, h] <-> [b, n, s, h] layout. GQA is handled inside the kernels (KV head j serves query heads
j*n/g .. (j+1)*n/g-1, Megatron's order), so K/V are never repeated in memory on the local paths.

What runs is a strategy chosen once at construction from the layer kind and R = `pg_collection.cp.size()`
(the CP group is taken from Megatron's `pg_collection` and kept; `forward` reads no global state):

    sparse, R = 1   `_LocalSparse`     the pattern through a whole-sequence kernel
    sparse, R > 1   `_ExchangeSparse`  the KV-reduced block exchange (`context_parallel/sparse_exchange.py`)
    full,   R = 1   `_LocalFull`       dense causal torch SDPA (cuDNN / flash inside torch; no [s, s] tensor)
    full,   R > 1   `_RingFull`        zig-zag ring attention (`context_parallel/ring_attention.py`)

and the backend each strategy runs is decided by `attention/backends.py:resolve_backend` (logged once):
at construction for the device and `params_dtype` the model will run with (so that a backend that cannot
run fails at build time, not at the first step), and again if activations ever arrive on another
device/dtype. `resolved` holds the latest decision; `attention_backend_summary(model)` lists them.

Inputs every form treats the same way (ValueError, naming the fix):
- `attention_mask` must be None. LongGen layers are causal by construction (`attn_mask_type=causal`);
  an [s, s] mask would cost s^2 memory at 128K, has no meaning per CP shard, and the data path creates
  none (`data/megatron_gpt.py`: create_attention_mask=False). Silently ignoring a mask could hide a
  padding or document mask the caller relies on, so it is refused, not ignored.
- `attn_mask_type` must be causal (None at `forward` means the constructor's);
- no dropout (Llama-2 trains without), `attention_bias` or `packed_seq_params`.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.attention.backends import ResolvedBackend, form_for, resolve_backend
from megatron_longgen.attention.kernels import available_kernels
from megatron_longgen.attention.masks import SparsePattern, pattern_from_config
from megatron_longgen.config import SparseAttentionConfig
from megatron_longgen.context_parallel.ring_attention import ring_attention
from megatron_longgen.context_parallel.sparse_exchange import sparse_cp_attention
from megatron_longgen.context_parallel.step_kernels import step_kernel


def to_bnsh(x_sbnh: torch.Tensor) -> torch.Tensor:
    """Megatron's [s, b, n, h] -> the kernels' [b, n, s, h] (a strided view, no copy)."""
    return x_sbnh.permute(1, 2, 0, 3)


def from_bnsh(out_bnsh: torch.Tensor) -> torch.Tensor:
    """The kernels' [b, n, s, h] -> Megatron's [s, b, n*h]."""
    b, n, s, h = out_bnsh.shape
    return out_bnsh.permute(2, 0, 1, 3).reshape(s, b, n * h)


class _LocalSparse:
    """Sparse layer, R = 1: the pattern through a whole-sequence kernel (`attention/kernels/`)."""

    def __init__(self, pattern: SparsePattern):
        self.pattern = pattern

    def bind(self, name: str, *, device: torch.device, dtype: torch.dtype):
        return available_kernels()[name]()

    def __call__(self, kernel, q_BNSH, k_BGSH, v_BGSH, *, scale: float) -> torch.Tensor:
        return kernel(q_BNSH, k_BGSH, v_BGSH, pattern=self.pattern, softmax_scale=scale)[0]


class _ExchangeSparse:
    """Sparse layer, R > 1: fetch the sink / halo / strided blocks, attend over [local | fetched] keys."""

    def __init__(self, pattern: SparsePattern, cp_group):
        self.pattern, self.cp_group = pattern, cp_group

    def bind(self, name: str, *, device: torch.device, dtype: torch.dtype):
        return name  # sparse_cp_attention takes the kernel by name

    def __call__(self, kernel, q_BNSH, k_BGSH, v_BGSH, *, scale: float) -> torch.Tensor:
        out, _ = sparse_cp_attention(
            q_BNSH,
            k_BGSH,
            v_BGSH,
            pattern=self.pattern,
            cp_group=self.cp_group,
            kernel=kernel,
            softmax_scale=scale,
        )
        return out


class _LocalFull:
    """Full layer, R = 1: dense causal attention through torch SDPA."""

    def bind(self, name: str, *, device: torch.device, dtype: torch.dtype):
        return None

    def __call__(self, kernel, q_BNSH, k_BGSH, v_BGSH, *, scale: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q_BNSH, k_BGSH, v_BGSH, is_causal=True, scale=scale, enable_gqa=q_BNSH.shape[1] != k_BGSH.shape[1]
        )


class _RingFull:
    """Full layer, R > 1: K/V rotate around the CP group, partial results merged by log-sum-exp."""

    def __init__(self, cp_group):
        self.cp_group = cp_group

    def bind(self, name: str, *, device: torch.device, dtype: torch.dtype):
        return step_kernel(name, device=device, dtype=dtype)

    def __call__(self, kernel, q_BNSH, k_BGSH, v_BGSH, *, scale: float) -> torch.Tensor:
        out, _ = ring_attention(
            q_BNSH, k_BGSH, v_BGSH, cp_group=self.cp_group, kernel=kernel, softmax_scale=scale
        )
        return out


def _cp_group(config: TransformerConfig, pg_collection):
    """The CP group from Megatron's `pg_collection` (None when there is no CP), checked against the config."""
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    size = group.size() if group is not None else 1
    if group is None and config.context_parallel_size > 1:
        raise ValueError(
            f"context_parallel_size {config.context_parallel_size} needs pg_collection.cp "
            "(Megatron passes it to core attention)"
        )
    if size != config.context_parallel_size:
        raise ValueError(
            f"pg_collection.cp has {size} ranks but config.context_parallel_size is {config.context_parallel_size}"
        )
    return group if size > 1 else None


def _run_device() -> torch.device:
    """Where Megatron puts the model: the current CUDA device if there is one, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


class LongGenCoreAttention(MegatronModule):
    """Causal core attention of a LongGen layer (module docstring): `kind` = "sparse" or "full".

    Constructed by Megatron from a `ModuleSpec` (`models/layer_specs.py`) whose params carry `kind`, and
    for sparse layers `sparse` (the SparseAttentionConfig: pattern and requested backend). `backend`
    overrides the requested backend (default: `sparse.backend` for sparse layers, `auto` for full ones).
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
        kind: str,
        sparse: SparseAttentionConfig | None = None,
        backend: str | None = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(
                f"LongGen {kind} attention supports attn_mask_type=causal only, got {attn_mask_type}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"LongGen {kind} attention has no dropout; got attention_dropout {dropout} (set it to 0)"
            )
        if kind == "sparse" and sparse is None:
            raise ValueError("a sparse layer needs sparse= (its SparseAttentionConfig)")
        cp_group = _cp_group(config, pg_collection)
        self.layer_number = layer_number
        self.kind = kind
        self.pattern: SparsePattern | None = pattern_from_config(sparse) if kind == "sparse" else None
        self.requested = backend or (sparse.backend if kind == "sparse" else "auto")
        self.cp_size = cp_group.size() if cp_group is not None else 1
        self.form = form_for(kind=kind, cp_size=self.cp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.strategy = {
            ("sparse", "local"): lambda: _LocalSparse(self.pattern),
            ("sparse", "exchange"): lambda: _ExchangeSparse(self.pattern, cp_group),
            ("full", "local"): _LocalFull,
            ("full", "ring"): lambda: _RingFull(cp_group),
        }[(kind, self.form)]()
        self._bound: dict[tuple, tuple[ResolvedBackend, object]] = {}
        self.resolved = self._bind(_run_device(), config.params_dtype)[0]

    def _bind(self, device: torch.device, dtype: torch.dtype) -> tuple[ResolvedBackend, object]:
        """The resolved backend and its kernel for activations on `device` with `dtype` (cached)."""
        key = (device.type, dtype)
        if key not in self._bound:
            resolved = resolve_backend(
                kind=self.kind,
                requested=self.requested,
                device=device,
                dtype=dtype,
                pattern=self.pattern,
                head_dim=self.head_dim,
                cp_size=self.cp_size,
            )
            self._bound[key] = (resolved, self.strategy.bind(resolved.name, device=device, dtype=dtype))
        return self._bound[key]

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
        if attention_mask is not None:
            raise ValueError(
                f"LongGen {self.kind} attention is causal by construction: pass attention_mask=None "
                f"(got a mask of shape {tuple(attention_mask.shape)}; padding / document masks are not supported)"
            )
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(
                f"LongGen {self.kind} attention supports attn_mask_type=causal only, got {attn_mask_type}"
            )
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                f"LongGen {self.kind} attention supports neither packed_seq_params nor attention_bias"
            )
        self.resolved, kernel = self._bind(query.device, query.dtype)
        out = self.strategy(kernel, to_bnsh(query), to_bnsh(key), to_bnsh(value), scale=self.softmax_scale)
        return from_bnsh(out)


def attention_backend_summary(model_chunks) -> str:
    """One line naming the backend every LongGen core attention of `model_chunks` (a module or a list of
    them) resolved to, with layer counts, e.g. for the trainer's start-up message."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    counts = Counter(
        m.resolved.describe().split("; skipped")[0]
        for chunk in chunks
        for m in chunk.modules()
        if isinstance(m, LongGenCoreAttention)
    )
    return "attention: " + (", ".join(f"{n} x {d}" for d, n in sorted(counts.items())) or "no LongGen layers")
