"""The oracle for the inference tests: transformers' own `LlamaForCausalLM`, full-sequence forward, with each
layer's dense [T, T] training mask (from `attention/masks.py`'s block rule), no KV cache.

It shares no code with `megatron_longgen.inference`: positions come from the attention mask here, the
mask from `pattern.block_rule` on token positions, and the attention is transformers' model with an SDPA
call on an explicit boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from megatron_longgen.checkpoint.hf_model import LongGenLlamaConfig, LongGenLlamaForCausalLM

ORACLE_ATTENTION = "longgen_test_dense"

# Tiny sparse settings that really bite at a few dozen tokens: a 12-token window (3 blocks of 4), one
# 4-token sink, a stride of 12 tokens (3 blocks) with 2 local blocks.
SPARSE = {
    "block_size": 4,
    "num_sink_blocks": 1,
    "num_window_blocks": 3,
    "stride_blocks": 3,
    "num_local_blocks": 2,
    "backend": "auto",
}


def tiny_config(*, layer_pattern: str = "SFFS", variant: str = "sink_window", kv_heads: int = 2, vocab: int = 97,
                hidden: int = 64, heads: int = 4, intermediate: int = 96, max_positions: int = 512,
                **sparse) -> LongGenLlamaConfig:  # fmt: skip
    return LongGenLlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=len(layer_pattern),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        longgen={"layer_pattern": layer_pattern, **SPARSE, **sparse, "variant": variant},
    )


def tiny_model(config: LongGenLlamaConfig, *, seed: int = 0, dtype=torch.float32) -> LongGenLlamaForCausalLM:
    """Random weights, scaled so that logits are peaked (greedy decoding then has clear winners)."""
    torch.manual_seed(seed)
    model = LongGenLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif "lm_head" in name or "embed" in name:
                param.mul_(20.0)
    return model.to(dtype)


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    mask = module.oracle_mask  # [B, 1, T, T]
    rep = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(rep, dim=1),
        value.repeat_interleave(rep, dim=1),
        attn_mask=mask,
        scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ORACLE_ATTENTION, _oracle_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ORACLE_ATTENTION, sdpa_mask)


def oracle_model(model: LongGenLlamaForCausalLM) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM with `model`'s weights and the oracle attention; `.patterns` holds
    the per-layer patterns of `model` at the time of the call."""
    fields = model.config.to_dict()
    for key in ("longgen", "model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    config = LlamaConfig(**fields)
    config._attn_implementation = ORACLE_ATTENTION
    ref = LlamaForCausalLM(config).eval().to(device=next(model.parameters()).device, dtype=model.dtype)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ref.patterns = [layer.self_attn.longgen_pattern for layer in model.model.layers]
    return ref


def dense_masks(patterns, positions: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [B, 1, T, T] boolean training masks for token positions [B, T] (-1 = padding)."""
    q = positions[:, :, None]
    k = positions[:, None, :]
    real = (q >= 0) & (k >= 0)
    masks = []
    for pattern in patterns:
        keep = real & (k <= q)
        if pattern is not None:
            b = pattern.block_size
            keep = keep & pattern.block_rule(q.clamp(min=0) // b, k.clamp(min=0) // b)
        # Padding queries attend to themselves only (their outputs are never compared): no NaN rows.
        eye = torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)[None]
        keep = keep | (eye & (q < 0))
        masks.append(keep[:, None])
    return masks


@torch.no_grad()
def oracle_logits(
    ref: LlamaForCausalLM, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [B, T, V] of the full-sequence dense-mask forward."""
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, -1)
    for layer, mask in zip(ref.model.layers, dense_masks(ref.patterns, positions)):
        layer.self_attn.oracle_mask = mask.to(ids.device)
    return ref(ids, position_ids=positions.clamp(min=0), use_cache=False).logits


@torch.no_grad()
def oracle_greedy(
    ref: LlamaForCausalLM, ids: torch.Tensor, *, max_new_tokens: int, stop: set[int] = frozenset()
):
    """Greedy continuation of one unpadded row [1, T] by full forwards (no cache)."""
    out = ids
    for _ in range(max_new_tokens):
        nxt = oracle_logits(ref, out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        if int(nxt) in stop:
            break
    return out


def left_pad(rows, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, W], attention mask [B, W]) for 1-D token rows padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask
