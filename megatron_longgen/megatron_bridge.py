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


def _has_fused_wgrad() -> bool:
    import importlib.util

    return (
        torch.cuda.is_available() and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    )


def to_transformer_config(cfg: LongGenConfig) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = TORCH_DTYPES[t.dtype]
    recompute = {}
    if t.recompute == "selective":
        recompute = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    elif t.recompute == "full":
        recompute = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    from megatron_longgen.training.pipeline_layout import pipeline_layout

    tcfg = TransformerConfig(
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
        # apex's fused weight-gradient accumulation only where its CUDA extension imports.
        gradient_accumulation_fusion=_has_fused_wgrad(),
        deallocate_pipeline_outputs=True,
        # Loss = sum over tokens / tokens in the global batch, exact under CP and uneven loss masks.
        calculate_per_token_loss=True,
        # Megatron's own TE switches follow the explicit choice (`models/layer_specs.py` builds the specs).
        transformer_impl=m.transformer_impl,
        # Stages balanced by estimated cost (full layers are dearer at long context); None = even split.
        pipeline_model_parallel_layout=pipeline_layout(cfg),
        **recompute,
    )
    apply_rope_scaling(tcfg, cfg)
    return tcfg


def apply_rope_scaling(tcfg: TransformerConfig, cfg: LongGenConfig) -> None:
    """Set the `yarn_*` attributes Megatron-Core 0.16.1's GPTModel reads (with `getattr`) when its
    position embedding is 'yarn'; a no-op for `none` (raised base only) and `linear` (position
    interpolation is GPTModel's `seq_len_interpolation_factor`, see models/builder.py).

    YaRN (Peng et al. 2023): frequencies with fewer than `yarn_beta_slow` rotations over the original
    context are divided by the factor, those with more than `yarn_beta_fast` are kept, a linear ramp in
    between; attention logits get the temperature 0.1·ln(factor) + 1 through cos/sin scaling
    (`yarn_mscale` 1, `yarn_mscale_all_dim` 0: Megatron's form of that default).
    """
    m = cfg.model
    if m.rope_scaling != "yarn":
        return
    tcfg.yarn_rotary_scaling_factor = m.rope_scaling_factor
    tcfg.yarn_original_max_position_embeddings = m.rope_original_max_position
    tcfg.yarn_beta_fast = m.yarn_beta_fast
    tcfg.yarn_beta_slow = m.yarn_beta_slow
    tcfg.yarn_mscale = 1.0
    tcfg.yarn_mscale_all_dim = 0.0
    tcfg.yarn_correction_range_round_to_int = True
