"""The one place that fills Megatron-Core's `TransformerConfig` from a `LongGenConfig`.

Llama-2 conventions: RMSNorm, SwiGLU (`gated_linear_unit` + SiLU), no biases, no dropout, RoPE applied
by GPTModel (see models/builder.py), GQA through `num_query_groups`. Fusions that need apex or
Transformer Engine stay off unless those are importable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.config import LongGenConfig

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int, *, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron pads the embedding table to a multiple of divisible_by * tp."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def to_transformer_config(cfg: LongGenConfig) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = TORCH_DTYPES[t.dtype]
    recompute = {}
    if t.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif t.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.kv_heads,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_parallel,
        context_parallel_size=p.context_parallel,
        sequence_parallel=p.sequence_parallel,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        # Loss = sum over tokens / tokens in the global batch, exact under CP and uneven loss masks.
        calculate_per_token_loss=True,
        **recompute,
    )
