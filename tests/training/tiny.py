"""A very small `debug_tiny` variant for the trainer tests (seconds per run on one CPU core)."""

from __future__ import annotations

import dataclasses

from megatron_longgen.config import apply_overrides
from megatron_longgen.recipes import debug_tiny

TINY_OVERRIDES = (
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "train.seq_length=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.lr_warmup_steps=3",
    "train.log_interval=1",
    "train.eval_interval=0",
)


def tiny_config(*overrides: str, pattern: str = "SFFS"):
    """debug_tiny shrunk to `len(pattern)` layers of width 64 at 128 tokens, plus `overrides`."""
    base = debug_tiny()
    model = dataclasses.replace(base.model, num_layers=len(pattern), layer_pattern=pattern)
    return apply_overrides(dataclasses.replace(base, model=model), [*TINY_OVERRIDES, *overrides])
