"""Build the LongGen hybrid Llama as a Megatron-Core `GPTModel`.

pattern string -> `build_block_spec` -> `TransformerBlockSubmodules(layer_specs=[...])` -> `GPTModel`.
A pattern of all `F` gives the plain Llama baseline through exactly the same code path.

RoPE: GPTModel applies rotary embeddings with each token's absolute position (no re-indexing in sparse
layers: LongGen's "static position indexing"). Length extension, chosen per recipe by
`ModelConfig.rope_scaling` and recorded in every checkpoint's `longgen_config.json`:
- `none`: only the raised base `ModelConfig.rotary_base` (the default: "ABF", 10,000 -> 500,000);
- `linear`: position interpolation, positions divided by `rope_scaling_factor`
  (GPTModel's `seq_len_interpolation_factor`);
- `yarn`: GPTModel's 'yarn' position embedding, parameters set on the TransformerConfig by
  `megatron_bridge.apply_rope_scaling`.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.compat import mcore
from megatron_longgen.config import LongGenConfig
from megatron_longgen.megatron_bridge import padded_vocab_size, to_transformer_config
from megatron_longgen.models.layer_specs import build_block_spec


def model_vocab_size(cfg: LongGenConfig) -> int:
    """Embedding rows, padded the Megatron way (to make_vocab_size_divisible_by * tp)."""
    return padded_vocab_size(
        cfg.model.vocab_size,
        divisible_by=cfg.model.make_vocab_size_divisible_by,
        tensor_parallel=cfg.parallel.tensor_parallel,
    )


def build_model(
    cfg: LongGenConfig,
    *,
    transformer_config: TransformerConfig | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
) -> GPTModel:
    """One model chunk (the whole model without pipeline parallelism). Needs Megatron's parallel state
    (`utils.distributed.initialize_model_parallel`) to be initialised.

    A GPTModel on every supported Megatron-Core, including 0.19.x, which deprecates it for HybridModel:
    `compat/mcore.py` says why LongGen keeps it; its one deprecation message is replaced by our own note."""
    tcfg = transformer_config or to_transformer_config(cfg)
    if cfg.model.rope_scaling == "yarn" and not hasattr(tcfg, "yarn_rotary_scaling_factor"):
        raise ValueError(
            "rope_scaling 'yarn' needs a TransformerConfig from megatron_bridge.to_transformer_config"
        )
    interpolation = cfg.model.rope_scaling_factor if cfg.model.rope_scaling == "linear" else None
    spec = build_block_spec(
        cfg.model.layer_pattern,
        sparse=cfg.sparse,
        config=tcfg,
        transformer_impl=cfg.model.transformer_impl,
        vp_stage=vp_stage,
    )
    kwargs = {}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    mcore.note_gpt_model_choice()
    with mcore.quiet_gpt_model_deprecation():
        return GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=model_vocab_size(cfg),
            max_sequence_length=cfg.train.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="yarn" if cfg.model.rope_scaling == "yarn" else "rope",
            rotary_base=cfg.model.rotary_base,
            seq_len_interpolation_factor=interpolation,
            vp_stage=vp_stage,
            **kwargs,
        )
