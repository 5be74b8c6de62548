"""Load a LongGen Megatron-Core checkpoint into our model in one process (evaluation, tests, inference).

`load_model(mcore_dir)` reads `longgen_config.json`, builds the GPTModel of `models/builder.py` at
TP=PP=CP=1 (keeping the checkpoint's padded vocabulary), loads `DIR/model` through dist_checkpointing
(which reshards from whatever TP/PP layout saved it) and wraps the model so logits come back with the
padding rows stripped.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_longgen.checkpoint import format as ckpt_format
from megatron_longgen.checkpoint.convert import ensure_process_group
from megatron_longgen.config import LongGenConfig, ParallelConfig


class StrippedVocabLM(torch.nn.Module):
    """Our GPTModel with logits cut back to the tokenizer vocabulary.

    `forward(input_ids [b, s], position_ids [b, s], attention_mask=None)` -> logits [b, s, vocab_size]
    (Megatron's padding rows removed). With `labels=`, the GPTModel's per-token loss is returned unchanged.
    The GPTModel itself is `.module`.
    """

    def __init__(self, module: torch.nn.Module, *, vocab_size: int):
        super().__init__()
        self.module = module
        self.vocab_size = vocab_size

    def forward(self, input_ids, position_ids, attention_mask=None, **kwargs):
        out = self.module(input_ids, position_ids, attention_mask, **kwargs)
        if kwargs.get("labels") is not None:
            return out
        return out[..., : self.vocab_size]


def single_process_config(cfg: LongGenConfig, *, dtype: str) -> LongGenConfig:
    """`cfg` at TP=PP=CP=1 with the same padded vocabulary as the checkpoint (padding of the recorded TP)."""
    tp = cfg.parallel.tensor_parallel
    model = dataclasses.replace(
        cfg.model, make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by * tp
    )
    parallel = ParallelConfig(
        tensor_parallel=1, pipeline_parallel=1, context_parallel=1, use_distributed_optimizer=False
    )
    train = dataclasses.replace(cfg.train, dtype=dtype)
    return dataclasses.replace(cfg, model=model, parallel=parallel, train=train)


def load_model(
    mcore_dir: str | os.PathLike, device: str | torch.device = "cpu", *, dtype: str = "fp32"
) -> tuple[StrippedVocabLM, LongGenConfig]:
    """Build our model at TP=PP=CP=1 in one process and load a LongGen checkpoint into it.

    Starts a one-rank gloo group when torch.distributed is not initialised, and (re)initialises Megatron's
    model-parallel state at TP=PP=CP=1. Returns `(model, cfg)`: `model(input_ids, position_ids, None)` gives
    logits [batch, seq, cfg.model.vocab_size] (vocabulary padding stripped); `cfg` is the recorded config.
    """
    from megatron.core import dist_checkpointing

    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    cfg = ckpt_format.load_config(mcore_dir)
    local = single_process_config(cfg, dtype=dtype)
    ensure_process_group()
    initialize_model_parallel(local)
    set_seed(local.train.seed)
    model = build_model(local)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_format.model_dir(mcore_dir)))
    model.load_state_dict(state)
    model = model.to(device).eval()
    return StrippedVocabLM(model, vocab_size=cfg.model.vocab_size), cfg
