"""The attention of one layer of `LongGenLlamaForCausalLM`: projections, RoPE, and LongGen's pattern over
a `LongGenCache`.

Legend: B = batch rows, N = query heads, G = KV heads, T = tokens of this forward, C = cache slots read,
H = head dim.

Design:
- `LongGenAttention` is transformers' `LlamaAttention` (same parameters and names, so HF checkpoints load)
  with its own forward: it takes the forward's `StepPlan` instead of transformers' 4-D mask.
- prefill: full layers run causal SDPA (flash / cuDNN / CPU flash: no [T, T] tensor); sparse layers run
  the project's kernel (resolved by `attention.backends.resolve_backend` once per pattern, device, dtype
  and head dim: cuDNN/Triton on GPUs, the torch kernel on CPU), causal over a whole sequence from 0. Padded
  rows are sliced to their real tokens and run one by one, so no padding mask exists either.
- decode: SDPA of one query per row over the layer's cache. Full layers read slots [0, length] with no mask
  unless rows differ in length ([B, 1, 1, C] then); sparse layers read their ~(sink + window) slots with a
  [B, 1, 1, C] mask that drops empty and stale slots. In a static decode step (CUDA graphs) full layers
  use the split-KV Triton kernel instead, whose key count is a device tensor.
- extend: see `step_plan.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from megatron_longgen.attention.kernels import SparseAttentionKernel
from megatron_longgen.attention.masks import SparsePattern
from megatron_longgen.inference.decode_kernel import split_kv_decode
from megatron_longgen.inference.kv_cache import LongGenCache
from megatron_longgen.inference.kv_layout import keep_mask
from megatron_longgen.inference.step_plan import StepPlan, store_tokens, write_decode


def sdpa(q_BNTH, k_BGCH, v_BGCH, *, mask=None, is_causal=False, scale: float) -> torch.Tensor:
    """SDPA with GQA (KV heads shared by N/G query heads, HF order)."""
    num_rep = q_BNTH.shape[1] // k_BGCH.shape[1]
    if num_rep > 1 and mask is not None and k_BGCH.shape[2] <= 65536:
        # Not every SDPA backend fuses GQA with a mask; repeating a short K/V (a sparse cache) is cheap.
        k_BGCH = k_BGCH.repeat_interleave(num_rep, dim=1)
        v_BGCH = v_BGCH.repeat_interleave(num_rep, dim=1)
        num_rep = 1
    return F.scaled_dot_product_attention(
        q_BNTH, k_BGCH, v_BGCH, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=num_rep > 1
    )


def causal_attention(q_BNTH, k_BGTH, v_BGTH, *, pattern, kernel, scale: float) -> torch.Tensor:
    """Causal attention of a whole sequence from position 0: the kernel for sparse layers, SDPA for full."""
    if pattern is None:
        return sdpa(q_BNTH, k_BGTH, v_BGTH, is_causal=True, scale=scale)
    out_BNTH, _ = kernel(q_BNTH, k_BGTH, v_BGTH, pattern=pattern, softmax_scale=scale)
    return out_BNTH


def prefill_attention(q_BNTH, k_BGTH, v_BGTH, *, pattern, kernel, spans, scale: float) -> torch.Tensor:
    """Prefill: unpadded batches in one call, padded rows sliced to their real tokens (padding rows out 0)."""
    if spans is None:
        return causal_attention(q_BNTH, k_BGTH, v_BGTH, pattern=pattern, kernel=kernel, scale=scale)
    out = q_BNTH.new_zeros(q_BNTH.shape)
    for row, (start, length) in enumerate(spans):
        part = slice(start, start + length)
        out[row : row + 1, :, part] = causal_attention(
            q_BNTH[row : row + 1, :, part],
            k_BGTH[row : row + 1, :, part],
            v_BGTH[row : row + 1, :, part],
            pattern=pattern,
            kernel=kernel,
            scale=scale,
        )
    return out


def extend_attention(
    q_BNTH, k_BGTH, v_BGTH, *, pattern, cache: LongGenCache, layer_idx: int, plan: StepPlan, scale
):
    """Several new tokens per row over a filled cache (see step_plan.py for the write order)."""
    if pattern is None:
        store_tokens(cache, layer_idx, k_BGTH, v_BGTH, plan)
        keys, values = cache.layer_buffers(layer_idx, like=k_BGTH)
        lengths = plan.lengths_before
        rows = (
            [slice(0, len(lengths))]
            if min(lengths) == max(lengths)
            else [slice(r, r + 1) for r in range(len(lengths))]
        )
        out = q_BNTH.new_empty(q_BNTH.shape)
        for sel in rows:
            total = lengths[sel.start] + plan.q_len
            bias = causal_lower_right(plan.q_len, total)  # query i sees keys <= total - q_len + i
            out[sel] = sdpa(q_BNTH[sel], keys[sel, :, :total], values[sel, :, :total], mask=bias, scale=scale)
        return out
    kind = cache.kind_of(layer_idx)
    keys, values = cache.layer_buffers(layer_idx, like=k_BGTH)
    all_k = torch.cat([keys, k_BGTH], dim=2)
    all_v = torch.cat([values, v_BGTH], dim=2)
    k_pos = torch.cat([kind.positions, plan.positions], dim=1)
    mask = keep_mask(pattern, q_pos=plan.positions[:, :, None], k_pos=k_pos[:, None, :])[:, None]
    out = sdpa(q_BNTH, all_k, all_v, mask=mask, scale=scale)
    store_tokens(cache, layer_idx, k_BGTH, v_BGTH, plan)
    return out


class LongGenAttention(LlamaAttention):
    """`LlamaAttention` running the layer's LongGen pattern (`longgen_pattern`: None = full attention).

    Called by `LongGenLlamaModel.forward` only (it needs the forward's `StepPlan`); calling it through
    transformers' `LlamaDecoderLayer.forward` raises.
    """

    longgen_pattern: SparsePattern | None = None

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        *,
        plan: StepPlan | None = None,
        cache: LongGenCache | None = None,
        kernel: SparseAttentionKernel | None = None,
        **unused,
    ) -> torch.Tensor:
        if plan is None:
            raise TypeError(
                "LongGenAttention runs inside LongGenLlamaModel.forward; the transformers decoder-layer "
                "forward does not provide its step plan"
            )
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, -1, self.head_dim)
        q_BNTH = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k_BGTH = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v_BGTH = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q_BNTH, k_BGTH = apply_rotary_pos_emb(q_BNTH, k_BGTH, cos, sin)
        pattern = self.longgen_pattern
        if plan.mode == "prefill":
            out = prefill_attention(
                q_BNTH, k_BGTH, v_BGTH, pattern=pattern, kernel=kernel, spans=plan.spans, scale=self.scaling
            )
            if cache is not None:
                store_tokens(cache, self.layer_idx, k_BGTH, v_BGTH, plan)
        elif plan.mode == "decode":
            keys, values, mask = write_decode(cache, self.layer_idx, k_BGTH, v_BGTH, plan)
            kv_len = plan.kinds[cache.kind_of(self.layer_idx).layout].kv_len_t
            if kv_len is not None:  # static decode: the split-KV kernel reads [0, kv_len) of the buffer
                out = split_kv_decode(q_BNTH[:, :, 0], keys, values, kv_len, scale=self.scaling).unsqueeze(2)
            else:
                out = sdpa(q_BNTH, keys, values, mask=mask, scale=self.scaling)
        else:
            out = extend_attention(
                q_BNTH,
                k_BGTH,
                v_BGTH,
                pattern=pattern,
                cache=cache,
                layer_idx=self.layer_idx,
                plan=plan,
                scale=self.scaling,
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))
