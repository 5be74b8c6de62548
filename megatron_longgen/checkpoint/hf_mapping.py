"""Declarative key tables: Hugging Face checkpoint keys <-> Megatron-Core (GPTModel) keys, per architecture.

Each row maps one or more HF keys to one Megatron key through a named transform (`transforms.py`). `{layer}`
stands for the layer index (the same index on both sides: Megatron's plain module keys count layers
globally). `expand_mapping` turns a table into concrete rows for a model and drops the output layer when the
embeddings are tied (Megatron then stores only `embedding.word_embeddings.weight`).

Megatron keys are the *plain* module keys of `GPTModel.state_dict()`; `format.sharded_key` turns them into
the dist-checkpoint keys (stacked layers, TE-style norm names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class KeyMapping:
    hf: tuple[str, ...]
    """HF keys, in the order the transform takes them."""
    mcore: str
    """Megatron-Core plain key."""
    transform: str
    """Name in `transforms.TRANSFORMS`."""


_L = "model.layers.{layer}"
_M = "decoder.layers.{layer}"

LLAMA_MAPPING: tuple[KeyMapping, ...] = (
    KeyMapping(
        hf=("model.embed_tokens.weight",), mcore="embedding.word_embeddings.weight", transform="vocab"
    ),
    KeyMapping(
        hf=(f"{_L}.input_layernorm.weight",), mcore=f"{_M}.input_layernorm.weight", transform="identity"
    ),
    KeyMapping(
        hf=(
            f"{_L}.self_attn.q_proj.weight",
            f"{_L}.self_attn.k_proj.weight",
            f"{_L}.self_attn.v_proj.weight",
        ),
        mcore=f"{_M}.self_attention.linear_qkv.weight",
        transform="qkv",
    ),
    KeyMapping(
        hf=(f"{_L}.self_attn.o_proj.weight",),
        mcore=f"{_M}.self_attention.linear_proj.weight",
        transform="identity",
    ),
    KeyMapping(
        hf=(f"{_L}.post_attention_layernorm.weight",),
        mcore=f"{_M}.pre_mlp_layernorm.weight",
        transform="identity",
    ),
    KeyMapping(
        hf=(f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"),
        mcore=f"{_M}.mlp.linear_fc1.weight",
        transform="gate_up",
    ),
    KeyMapping(hf=(f"{_L}.mlp.down_proj.weight",), mcore=f"{_M}.mlp.linear_fc2.weight", transform="identity"),
    KeyMapping(hf=("model.norm.weight",), mcore="decoder.final_layernorm.weight", transform="identity"),
    KeyMapping(hf=("lm_head.weight",), mcore="output_layer.weight", transform="vocab"),
)

# Buffers some older HF Llama checkpoints store; they are recomputed, never converted.
LLAMA_IGNORED_HF_KEYS: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

# HF `architectures` / `model_type` values each table supports.
MAPPINGS: dict[str, tuple[KeyMapping, ...]] = {"llama": LLAMA_MAPPING}
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "LongGenLlamaForCausalLM": "llama",
}


def expand_mapping(
    table: tuple[KeyMapping, ...], *, num_layers: int, tie_embeddings: bool
) -> list[KeyMapping]:
    """Concrete rows for a model with `num_layers` layers, in checkpoint order: the rows before the layer
    rows (embedding), then layer by layer, then the rest (final norm, head).

    With tied embeddings the `output_layer.weight` row is dropped: HF's `lm_head.weight`, if a file has it,
    is the same tensor as the embedding and is skipped (see `tied_hf_keys`).
    """
    kept = [row for row in table if not (tie_embeddings and row.mcore == "output_layer.weight")]
    first_layer_row = next(i for i, row in enumerate(kept) if "{layer}" in row.mcore)
    layer_rows = [row for row in kept if "{layer}" in row.mcore]
    rows = [row for row in kept[:first_layer_row] if "{layer}" not in row.mcore]
    for layer in range(num_layers):
        rows += [
            KeyMapping(
                hf=tuple(k.format(layer=layer) for k in row.hf),
                mcore=row.mcore.format(layer=layer),
                transform=row.transform,
            )
            for row in layer_rows
        ]
    rows += [row for row in kept[first_layer_row:] if "{layer}" not in row.mcore]
    return rows


def tied_hf_keys(table: tuple[KeyMapping, ...], *, tie_embeddings: bool) -> tuple[str, ...]:
    """HF keys that are allowed (and skipped) when embeddings are tied."""
    if not tie_embeddings:
        return ()
    return tuple(k for row in table if row.mcore == "output_layer.weight" for k in row.hf)


def is_ignored_hf_key(key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in LLAMA_IGNORED_HF_KEYS)


def check_coverage(*, rows: list[KeyMapping], hf_keys: set[str], tie_embeddings: bool) -> None:
    """Every HF key must be used by a row (or be a known ignorable / tied key) and every row's HF keys must
    exist. Raises ValueError listing the first offending keys."""
    needed = {k for row in rows for k in row.hf}
    missing = sorted(needed - hf_keys)
    if missing:
        raise ValueError(
            f"{len(missing)} HF tensors the config needs are missing from the checkpoint, e.g. {missing[:5]}"
        )
    tied = set(tied_hf_keys(LLAMA_MAPPING, tie_embeddings=tie_embeddings))
    unused = sorted(k for k in hf_keys - needed - tied if not is_ignored_hf_key(k))
    if unused:
        raise ValueError(
            f"{len(unused)} HF tensors are not used by the conversion table (wrong num_hidden_layers or an "
            f"unsupported architecture?), e.g. {unused[:5]}"
        )
