"""Turn the layer pattern string into Megatron-Core layer specs (STYLE rule 2: one function, one string).

`build_block_spec(pattern, ...)` maps each character of the pattern to a `ModuleSpec` of a Llama layer
(RMSNorm -> SelfAttention(linear_qkv, core_attention, linear_proj) -> RMSNorm -> SwiGLU MLP) and returns
`TransformerBlockSubmodules(layer_specs=[...])` for the layers of this pipeline stage (Megatron builds one
block per (virtual) stage, so the pattern is sliced with Megatron's own layer offset). Every layer's
`core_attention` is `LongGenCoreAttention(kind=...)` (attention/core_attention.py), which picks its
context-parallel form from the CP group Megatron hands it:

    'S'  LongGenCoreAttention(kind="sparse", sparse=...)   whole-sequence kernel, or the KV-reduced exchange
    'F'  LongGenCoreAttention(kind="full")                 torch SDPA, or zig-zag ring attention

`transformer_impl` (`ModelConfig.transformer_impl`) chooses the rest of the layer explicitly:
- `local` (default): Megatron's own parallel linears and our RMSNorm; Transformer Engine is never imported;
- `transformer_engine`: TE's fused norm + linear layers, and TE's `TEDotProductAttention` for full layers
  without CP (with CP, full layers keep LongGen's ring attention, sparse layers always keep ours). Asking
  for it where TE is not installed is a ValueError with the install hint.
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

from megatron_longgen.attention.core_attention import LongGenCoreAttention
from megatron_longgen.compat import mcore
from megatron_longgen.config import SparseAttentionConfig
from megatron_longgen.config.schema import TRANSFORMER_IMPLS
from megatron_longgen.models.layer_pattern import FULL, SPARSE
from megatron_longgen.models.norms import RMSNorm
from megatron_longgen.utils.optional import has_te, require


def check_transformer_impl(transformer_impl: str) -> None:
    """ValueError unless `transformer_impl` is known and, for `transformer_engine`, TE is installed."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}")
    if transformer_impl == "transformer_engine" and not has_te():
        try:
            require("transformer_engine", feature="model.transformer_impl='transformer_engine'")
        except ImportError as exc:
            raise ValueError(f"{exc} (or set model.transformer_impl=local)") from None


def core_attention_spec(
    kind: str,
    *,
    sparse: SparseAttentionConfig,
    transformer_impl: str = "local",
    context_parallel: bool = False,
) -> ModuleSpec | type:
    """The `core_attention` submodule of one layer kind (`S` or `F`)."""
    if kind == SPARSE:
        return ModuleSpec(module=LongGenCoreAttention, params={"kind": "sparse", "sparse": sparse})
    if kind != FULL:
        raise ValueError(f"layer kind must be 'S' or 'F', got {kind!r}")
    if transformer_impl == "transformer_engine" and not context_parallel:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return ModuleSpec(module=LongGenCoreAttention, params={"kind": "full"})


def build_layer_spec(
    kind: str,
    *,
    sparse: SparseAttentionConfig,
    transformer_impl: str = "local",
    context_parallel: bool = False,
) -> ModuleSpec:
    """A Llama decoder layer whose core attention matches `kind`."""
    check_transformer_impl(transformer_impl)
    core = core_attention_spec(
        kind, sparse=sparse, transformer_impl=transformer_impl, context_parallel=context_parallel
    )
    if transformer_impl == "transformer_engine":
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
            mlp=mcore.mlp_submodule(
                linear_fc1=fc1, linear_fc2=fc2
            ),  # 0.16: ModuleSpec; 0.19: as_mlp_submodule
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def build_block_spec(
    pattern: str,
    *,
    sparse: SparseAttentionConfig,
    config: TransformerConfig,
    transformer_impl: str = "local",
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Specs for the layers this pipeline stage (and virtual stage) builds, from the global pattern."""
    if len(pattern) != config.num_layers:
        raise ValueError(
            f"layer_pattern has {len(pattern)} characters but the model has {config.num_layers} layers"
        )
    check_transformer_impl(transformer_impl)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    local = pattern[offset : offset + count]
    context_parallel = config.context_parallel_size > 1
    specs = [
        build_layer_spec(
            kind, sparse=sparse, transformer_impl=transformer_impl, context_parallel=context_parallel
        )
        for kind in local
    ]
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
