"""Named tensor transforms between Hugging Face Llama and Megatron-Core layouts (global, unsharded tensors).

Legend: h = hidden size, n = query heads, g = KV heads (Megatron: `num_query_groups`), d = head dim
(`kv_channels`), f = ffn size, V = tokenizer vocabulary, Vp = Megatron's padded vocabulary.

Each transform is a pair `to_mcore(hf_tensors) -> tensor` / `to_hf(tensor) -> hf_tensors` registered under a
name that the key tables of `hf_mapping.py` refer to. They are exact inverses (pure reshapes, cats and
slices), so a round trip is bit-exact:

- `identity`  one tensor, unchanged.
- `qkv`       q [n*d, h], k [g*d, h], v [g*d, h]  <->  linear_qkv [(n + 2g)*d, h], grouped per query group:
              for each group j: the n/g query heads of group j, then k_j, then v_j (Megatron's order; the TP
              split then hands whole groups to each rank).
- `gate_up`   gate [f, h], up [f, h]  <->  linear_fc1 [2f, h] = cat(gate, up) (Megatron's SwiGLU order;
              its checkpoint factory keeps this global layout at every TP size).
- `vocab`     [V, h]  <->  [Vp, h]: zero rows appended on import, stripped on export.

No RoPE permutation: Megatron's default (non-interleaved) rotary embedding rotates halves like HF's
`rotate_half`, so q/k rows keep their order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class TransformContext:
    """Shapes the transforms need (from the model config)."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


@dataclass(frozen=True)
class Transform:
    name: str
    num_hf_tensors: int
    to_mcore: Callable[[list[torch.Tensor], TransformContext], torch.Tensor]
    to_hf: Callable[[torch.Tensor, TransformContext], list[torch.Tensor]]


def _check_rows(name: str, tensor: torch.Tensor, rows: int, what: str) -> None:
    if tensor.dim() != 2 or tensor.shape[0] != rows:
        raise ValueError(f"{what}: expected {rows} rows for {name}, got shape {tuple(tensor.shape)}")


def pack_qkv(tensors: list[torch.Tensor], ctx: TransformContext) -> torch.Tensor:
    """q [n*d, h], k [g*d, h], v [g*d, h] -> linear_qkv [(n+2g)*d, h] grouped by query group."""
    q_Nh, k_Gh, v_Gh = tensors
    n, g, d = ctx.num_attention_heads, ctx.num_query_groups, ctx.head_dim
    _check_rows("q_proj", q_Nh, n * d, "qkv")
    _check_rows("k_proj", k_Gh, g * d, "qkv")
    _check_rows("v_proj", v_Gh, g * d, "qkv")
    h = q_Nh.shape[1]
    q_g = q_Nh.reshape(g, (n // g) * d, h)
    k_g = k_Gh.reshape(g, d, h)
    v_g = v_Gh.reshape(g, d, h)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape((n + 2 * g) * d, h)


def unpack_qkv(qkv: torch.Tensor, ctx: TransformContext) -> list[torch.Tensor]:
    """Inverse of `pack_qkv`: linear_qkv [(n+2g)*d, h] -> [q, k, v] (contiguous copies)."""
    n, g, d = ctx.num_attention_heads, ctx.num_query_groups, ctx.head_dim
    _check_rows("linear_qkv", qkv, (n + 2 * g) * d, "qkv")
    h = qkv.shape[1]
    per_group = qkv.reshape(g, (n // g + 2) * d, h)
    q_g, k_g, v_g = torch.split(per_group, [(n // g) * d, d, d], dim=1)
    return [q_g.reshape(n * d, h).clone(), k_g.reshape(g * d, h).clone(), v_g.reshape(g * d, h).clone()]


def fuse_gate_up(tensors: list[torch.Tensor], ctx: TransformContext) -> torch.Tensor:
    """gate [f, h], up [f, h] -> linear_fc1 [2f, h]."""
    gate, up = tensors
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj shape {tuple(gate.shape)} != up_proj shape {tuple(up.shape)}")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, ctx: TransformContext) -> list[torch.Tensor]:
    """Inverse of `fuse_gate_up`."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 must have an even number of rows, got shape {tuple(fc1.shape)}")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return [gate.clone(), up.clone()]


def pad_vocab(tensors: list[torch.Tensor], ctx: TransformContext) -> torch.Tensor:
    """[V, h] -> [Vp, h] with zero rows (Megatron's padded embedding; the rows are never real tokens)."""
    (weight,) = tensors
    _check_rows("a vocabulary tensor", weight, ctx.vocab_size, "vocab (config vocab_size)")
    pad = ctx.padded_vocab_size - ctx.vocab_size
    if pad == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(pad, weight.shape[1])], dim=0)


def strip_vocab(weight: torch.Tensor, ctx: TransformContext) -> list[torch.Tensor]:
    """[Vp', h] -> [V, h]; Vp' may differ from ctx.padded_vocab_size (saved at another TP size)."""
    if weight.dim() != 2 or weight.shape[0] < ctx.vocab_size:
        raise ValueError(
            f"vocab: a padded vocabulary tensor needs >= {ctx.vocab_size} rows, "
            f"got shape {tuple(weight.shape)}"
        )
    return [weight[: ctx.vocab_size].clone()]


def _identity_to_mcore(tensors: list[torch.Tensor], ctx: TransformContext) -> torch.Tensor:
    return tensors[0]


def _identity_to_hf(tensor: torch.Tensor, ctx: TransformContext) -> list[torch.Tensor]:
    return [tensor]


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("identity", 1, _identity_to_mcore, _identity_to_hf),
        Transform("qkv", 3, pack_qkv, unpack_qkv),
        Transform("gate_up", 2, fuse_gate_up, split_gate_up),
        Transform("vocab", 1, pad_vocab, strip_vocab),
    )
}


def get_transform(name: str) -> Transform:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]
