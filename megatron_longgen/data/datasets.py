"""Build the train / validation datasets a run reads.

Every dataset yields dicts of `tokens` [s] int64, `labels` [s] int64, `loss_mask` [s] float32 and
`position_ids` [s] int64, for s = `cfg.train.seq_length`.
"""

from __future__ import annotations

from megatron_longgen.config import LongGenConfig
from megatron_longgen.data.packed import build_packed_datasets
from megatron_longgen.data.tokenizers import Tokenizer


def build_datasets(cfg: LongGenConfig, *, tokenizer: Tokenizer):
    """(train, valid-or-None) for `cfg.data`."""
    return build_packed_datasets(
        cfg.data.corpus,
        tokenizer=tokenizer,
        seq_length=cfg.train.seq_length,
        valid_fraction=cfg.data.valid_fraction,
    )
