"""A transformers-compatible LongGen Llama: HF's `LlamaForCausalLM` whose sparse layers apply LongGen's masks.

Legend: b = batch, n = query heads, g = KV heads, q = query length, k = key length, d = head dim.

How HF users load an exported folder (no network, no `trust_remote_code`)::

    from megatron_longgen.checkpoint.hf_model import LongGenLlamaForCausalLM
    # a folder written by tools/convert_mcore_to_hf.py
    model = LongGenLlamaForCausalLM.from_pretrained("llama2-7b-longgen-hf")
    logits = model(input_ids).logits

or, after `register_auto_classes()`, through `AutoModelForCausalLM.from_pretrained(...)`.

Design:
- The exported `config.json` has `model_type: longgen_llama` (so plain `LlamaForCausalLM` is not picked by
  accident and silently run dense) and a `longgen` section: `layer_pattern` (`S`/`F` per layer, bottom
  first) and the `SparseAttentionConfig` fields (variant, block_size, sinks, window, stride, local blocks).
- Weights and module names are HF Llama's; only the attention function differs. It is registered with
  transformers' `AttentionInterface` as `longgen_sdpa`: full layers run HF's SDPA path unchanged; sparse
  layers build the block mask of `megatron_longgen.attention.masks` (the same `block_rule` Megatron's
  kernels use) and run SDPA with it.
- Positions: query i of a step is token `k - q + i` (keys are every cached token, 0..k-1): right for
  prefill and for decoding with a growing cache and no left padding. A padding mask passed by transformers
  is combined with the sparse mask.
- Sparse layers materialise a [q, k] boolean mask: fine for checks and moderate lengths, not a 128K
  serving path (use the Megatron model or the inference package for that).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from megatron_longgen.attention.masks import SparsePattern, pattern_from_config
from megatron_longgen.config import SparseAttentionConfig

ATTENTION_NAME = "longgen_sdpa"


class LongGenLlamaConfig(LlamaConfig):
    """LlamaConfig plus the `longgen` section (dict) written by `convert.longgen_to_hf_config`."""

    model_type = "longgen_llama"


def layer_patterns(config: LlamaConfig) -> list[SparsePattern | None]:
    """Per layer: the sparse pattern of an `S` layer, None for an `F` layer. Raises ValueError when the
    config has no usable `longgen` section."""
    section = getattr(config, "longgen", None)
    if not isinstance(section, dict) or "layer_pattern" not in section:
        raise ValueError("config has no 'longgen' section with a layer_pattern: not a LongGen export")
    layout = section["layer_pattern"]
    if len(layout) != config.num_hidden_layers:
        raise ValueError(
            f"longgen.layer_pattern has {len(layout)} characters but num_hidden_layers is "
            f"{config.num_hidden_layers}"
        )
    sparse = SparseAttentionConfig(**{k: v for k, v in section.items() if k != "layer_pattern"})
    pattern = pattern_from_config(sparse)
    return [pattern if kind == "S" else None for kind in layout]


def sparse_keep_mask(pattern: SparsePattern, *, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[q, k] booleans (True = attend) for queries at positions k-q .. k-1 over keys 0 .. k-1."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    block = pattern.block_size
    return (k_pos <= q_pos) & pattern.block_rule(q_pos // block, k_pos // block)


def longgen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [b, n, q, d], key/value [b, g, k, d] -> ([b, q, n, d], None)."""
    pattern = getattr(module, "longgen_pattern", None)
    if pattern is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q_len, k_len = query.shape[2], key.shape[2]
    keep_QK = sparse_keep_mask(pattern, q_len=q_len, k_len=k_len, device=query.device)
    if attention_mask is None:
        mask = keep_QK
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask[:, :, :, :k_len] & keep_QK
    else:  # additive float mask
        mask = attention_mask[:, :, :, :k_len].masked_fill(~keep_QK, torch.finfo(query.dtype).min)
    num_rep = query.shape[1] // key.shape[1]
    out_bnqd = F.scaled_dot_product_attention(
        query,
        repeat_kv(key, num_rep),
        repeat_kv(value, num_rep),
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
    )
    return out_bnqd.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make `longgen_sdpa` known to transformers (attention function + SDPA-style mask). Idempotent."""
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, longgen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


class LongGenLlamaForCausalLM(LlamaForCausalLM):
    """HF Llama with LongGen's per-layer sparse attention (see the module docstring for loading)."""

    config_class = LongGenLlamaConfig

    def __init__(self, config: LlamaConfig):
        register_attention()
        patterns = layer_patterns(config)
        config._attn_implementation = ATTENTION_NAME
        super().__init__(config)
        for layer, pattern in zip(self.model.layers, patterns):
            layer.self_attn.longgen_pattern = pattern

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        register_attention()
        kwargs.setdefault("attn_implementation", ATTENTION_NAME)
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(*args, **kwargs)


def register_auto_classes() -> None:
    """Register `longgen_llama` with AutoConfig / AutoModelForCausalLM (for code that uses the Auto API)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with contextlib.suppress(ValueError):  # already registered in this process
        AutoConfig.register(LongGenLlamaConfig.model_type, LongGenLlamaConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(LongGenLlamaConfig, LongGenLlamaForCausalLM)
