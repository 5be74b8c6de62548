"""HF Llama `config.json` <-> LongGenConfig: what the converter records and what it exports.

- `hf_config_to_longgen(hf)` maps LlamaConfig fields (transformers v4 `rope_theta`/`rope_scaling` or v5
  `rope_parameters`; RoPE `default`, `linear` or `yarn`) onto a LongGenConfig, with the LongGen layer
  pattern (the one a LongGen export records, LongGen's default, all full, or an explicit string) and
  rejects what the converter cannot represent (biases, other activations, unusual head sizes, YaRN
  options), naming the value.
- `longgen_to_hf_config(cfg)` is the inverse for the exporter: LlamaConfig fields plus a `longgen`
  section (per-layer layout and sparse parameters) read by `hf_model.LongGenLlamaConfig`.
- `expected_hf_shapes(cfg)` and `transform_context(cfg)` tie a config to the tensors the streaming
  converter (`streaming.py`) reads and writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from megatron_longgen.checkpoint.hf_mapping import SUPPORTED_ARCHITECTURES
from megatron_longgen.checkpoint.transforms import TransformContext
from megatron_longgen.config import (
    LongGenConfig,
    ModelConfig,
    ParallelConfig,
    SparseAttentionConfig,
    TrainingConfig,
    apply_overrides,
)
from megatron_longgen.models.layer_pattern import default_layer_pattern, full_pattern

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_STEPS = 1000
"""`train.max_steps` recorded by the importer. The paper's stage is ~5B tokens; at 128K-token sequences and
a global batch of 32 that is ~1,200 steps, so 1000 is a sensible order of magnitude. Recipes and the
trainer override it (`--max-steps` or `--override train.max_steps=N`)."""


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """`HF_DIR/config.json` as a dict; FileNotFoundError / ValueError name the file."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an HF checkpoint folder needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _rope(hf: dict) -> dict:
    """ModelConfig RoPE fields from either the transformers v4 (`rope_theta` + `rope_scaling`) or v5
    (`rope_parameters`) layout: raised base only (`default`), position interpolation (`linear`) or YaRN."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type") or merged.get("type") or "default"
    factor = float(merged.get("factor", 1.0))
    if kind == "default":
        return {"rotary_base": theta, "rope_scaling": "none", "rope_scaling_factor": 1.0}
    if kind == "linear":
        return {"rotary_base": theta, "rope_scaling": "linear", "rope_scaling_factor": factor}
    if kind == "yarn":
        unsupported = {
            k: merged[k]
            for k in ("attention_factor", "mscale", "mscale_all_dim")
            if merged.get(k) is not None
        }
        if unsupported or merged.get("truncate", True) is False:
            raise ValueError(
                f"YaRN options {unsupported or {'truncate': False}} are not supported (only the default "
                "attention factor 0.1*ln(factor)+1 with truncated correction range)"
            )
        return {
            "rotary_base": theta,
            "rope_scaling": "yarn",
            "rope_scaling_factor": factor,
            "rope_original_max_position": int(
                merged.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096)
            ),
            "yarn_beta_fast": float(merged.get("beta_fast", 32.0)),
            "yarn_beta_slow": float(merged.get("beta_slow", 1.0)),
        }
    raise ValueError(f"unsupported RoPE scaling {kind!r} in config.json (supported: default, linear, yarn)")


def hf_config_to_longgen(
    hf: dict,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    pattern: str | None = None,
    sparse_variant: str | None = None,
    dtype: str | None = None,
    seq_length: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    overrides: tuple[str, ...] = (),
    name: str = "converted_hf_llama",
) -> LongGenConfig:
    """A LongGenConfig for an HF Llama `config.json` (as a dict).

    pattern: None -> the `longgen.layer_pattern` recorded by our exporter, else the LongGen default (middle
    third full); `"full"` -> all full layers; otherwise an explicit `S`/`F` string. `dtype` None -> the HF
    config's dtype when it is fp32/bf16/fp16, else bf16. `seq_length` None -> `max_position_embeddings`.
    Raises ValueError for unsupported architectures or options, naming the value.
    """
    archs = hf.get("architectures") or []
    if hf.get("model_type") not in ("llama", "longgen_llama") or not any(
        a in SUPPORTED_ARCHITECTURES for a in archs
    ):
        raise ValueError(
            f"unsupported architecture {archs} (model_type {hf.get('model_type')!r}); "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"config.json sets {flag}=true; Llama-2 (and this converter) has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (Llama uses silu)")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            f"head_dim {head_dim} * num_attention_heads {heads} != hidden_size {hidden} is not supported"
        )
    rope = {"rope_original_max_position": hf.get("max_position_embeddings", 4096), **_rope(hf)}
    num_layers = hf["num_hidden_layers"]
    recorded = hf.get("longgen") or {}
    if pattern is None:
        layer_pattern = recorded.get("layer_pattern") or default_layer_pattern(num_layers)
    elif pattern == "full":
        layer_pattern = full_pattern(num_layers)
    elif pattern == "default":
        layer_pattern = default_layer_pattern(num_layers)
    else:
        layer_pattern = pattern
    if dtype is None:
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype")
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(hf_dtype, "bf16")
    sparse_fields = {
        k: v for k, v in recorded.items() if k in {f.name for f in dataclasses.fields(SparseAttentionConfig)}
    }
    if sparse_variant is not None:
        sparse_fields["variant"] = sparse_variant
        if "S" not in layer_pattern:
            warnings.warn(
                f"sparse variant {sparse_variant!r} has no effect: layer pattern {layer_pattern!r} has no sparse layers",
                stacklevel=2,
            )
    cfg = LongGenConfig(
        name=name,
        model=ModelConfig(
            num_layers=num_layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            layer_pattern=layer_pattern,
            **rope,
            norm_epsilon=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ),
        sparse=SparseAttentionConfig(**sparse_fields),
        parallel=ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel),
        train=TrainingConfig(
            seq_length=seq_length or hf.get("max_position_embeddings", 4096), max_steps=max_steps, dtype=dtype
        ),
    )
    return apply_overrides(cfg, list(overrides))


def longgen_to_hf_config(cfg: LongGenConfig, *, dtype: torch.dtype) -> dict:
    """`config.json` for the exported folder: LlamaConfig fields plus a `longgen` section (per-layer layout
    and sparse parameters) read by `hf_model.LongGenLlamaConfig`."""
    m, s = cfg.model, cfg.sparse
    rope = {
        "rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling,
        "rope_theta": m.rotary_base,
    }
    if m.rope_scaling in ("linear", "yarn"):
        rope["factor"] = m.rope_scaling_factor
    if m.rope_scaling == "yarn":
        rope.update(
            original_max_position_embeddings=m.rope_original_max_position,
            beta_fast=m.yarn_beta_fast,
            beta_slow=m.yarn_beta_slow,
        )
    return {
        "architectures": ["LongGenLlamaForCausalLM"],
        "model_type": "longgen_llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.train.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base,
        "rope_parameters": rope,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": HF_DTYPE_NAMES[dtype],
        "longgen": {"layer_pattern": m.layer_pattern, **dataclasses.asdict(s)},
    }


def transform_context(cfg: LongGenConfig, *, padded_vocab_size: int) -> TransformContext:
    m = cfg.model
    return TransformContext(
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.kv_heads,
        head_dim=m.head_dim,
        vocab_size=m.vocab_size,
        padded_vocab_size=padded_vocab_size,
    )


def expected_hf_shapes(cfg: LongGenConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the config implies (to catch config/weight mismatches by name)."""
    m = cfg.model
    h, d, f, v = m.hidden_size, m.head_dim, m.ffn_hidden_size, m.vocab_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (m.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (m.kv_heads * d, h),
        "self_attn.v_proj.weight": (m.kv_heads * d, h),
        "self_attn.o_proj.weight": (h, m.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(m.num_layers):
        shapes.update({f"model.layers.{layer}.{k}": s for k, s in per_layer.items()})
    return shapes
