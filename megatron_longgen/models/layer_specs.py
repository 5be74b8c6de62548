"""Turn the layer pattern string into Megatron-Core layer specs (STYLE rule 2: one function, one string).

`build_block_spec(pattern, ...)` maps each character of the pattern to a `ModuleSpec` of a Llama layer
(RMSNorm -> SelfAttention(linear_qkv, core_attention, linear_proj) -> RMSNorm -> SwiGLU MLP) whose
`core_attention` is:

    'S'  SparseCoreAttention(sparse=...)        (attention/core_attention.py)
    'F'  FullCoreAttention (torch SDPA), or TE's TEDotProductAttention when Transformer Engine is installed

and returns `TransformerBlockSubmodules(layer_specs=[...])` for the layers of this pipeline stage (Megatron
builds one block per (virtual) stage, so the pattern is sliced with Megatron's own layer offset).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_longgen.attention.core_attention import FullCoreAttention, SparseCoreAttention
from megatron_longgen.compat import mcore
from megatron_longgen.config import SparseAttentionConfig
from megatron_longgen.models.layer_pattern import FULL, SPARSE
from megatron_longgen.models.norms import RMSNorm
from megatron_longgen.utils.optional import has_te


def core_attention_spec(
    kind: str, *, sparse: SparseAttentionConfig, use_te: bool, context_parallel: bool = False
) -> ModuleSpec | type:
    """The `core_attention` submodule for one layer kind (`S` or `F`); with `context_parallel` (CP > 1)
    the zig-zag ring / KV-reduced exchange modules of `context_parallel/core_attention.py`."""
    if context_parallel:
        from megatron_longgen.context_parallel.core_attention import (
            ContextParallelFullAttention,
            ContextParallelSparseAttention,
        )

        if kind == SPARSE:
            return ModuleSpec(module=ContextParallelSparseAttention, params={"sparse": sparse})
        if kind == FULL:
            return ContextParallelFullAttention
        raise ValueError(f"layer kind must be 'S' or 'F', got {kind!r}")
    if kind == SPARSE:
        return ModuleSpec(module=SparseCoreAttention, params={"sparse": sparse})
    if kind == FULL:
        if use_te:
            from megatron.core.extensions.transformer_engine import TEDotProductAttention

            return TEDotProductAttention
        return FullCoreAttention
    raise ValueError(f"layer kind must be 'S' or 'F', got {kind!r}")


def build_layer_spec(
    kind: str, *, sparse: SparseAttentionConfig, use_te: bool = False, context_parallel: bool = False
) -> ModuleSpec:
    """A Llama decoder layer whose core attention matches `kind`."""
    core = core_attention_spec(kind, sparse=sparse, use_te=use_te, context_parallel=context_parallel)
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        # TE fuses the pre-attention / pre-MLP RMSNorm into the following linear layer.
        input_norm, pre_mlp_norm = IdentityOp, IdentityOp
        linear_qkv, linear_proj = TELayerNormColumnParallelLinear, TERowParallelLinear
        fc1, fc2 = TELayerNormColumnParallelLinear, TERowParallelLinear
        keys_map = {}
    else:
        input_norm, pre_mlp_norm = RMSNorm, RMSNorm
        linear_qkv, linear_proj = ColumnParallelLinear, RowParallelLinear
        fc1, fc2 = ColumnParallelLinear, RowParallelLinear
        # Checkpoint keys of the unfused norms match TE's fused names (Megatron's local spec does the same).
        keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_qkv,
                    core_attention=core,
                    linear_proj=linear_proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mcore.mlp_submodule(linear_fc1=fc1, linear_fc2=fc2),  # 0.16: ModuleSpec; 0.19: as_mlp_submodule
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def build_block_spec(
    pattern: str,
    *,
    sparse: SparseAttentionConfig,
    config: TransformerConfig,
    use_te: bool | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Specs for the layers this pipeline stage (and virtual stage) builds, from the global pattern."""
    if len(pattern) != config.num_layers:
        raise ValueError(f"layer_pattern has {len(pattern)} characters but the model has {config.num_layers} layers")
    use_te = has_te() if use_te is None else use_te
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    local = pattern[offset : offset + count]
    context_parallel = config.context_parallel_size > 1
    specs = [
        build_layer_spec(kind, sparse=sparse, use_te=use_te, context_parallel=context_parallel) for kind in local
    ]
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
