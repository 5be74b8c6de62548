"""Build the train / validation datasets a run reads.

Two sources, chosen by `cfg.data`:
- `blend` set: Megatron-Core indexed datasets written by `tools/preprocess_data.py`, packed and blended by
  Megatron-Core's GPTDataset / BlendedMegatronDatasetBuilder (`megatron_gpt.py`). The real-run path.
- otherwise `corpus`: a plain-text file or `builtin:tiny_stories`, packed in memory (`packed.py`). The
  tiny CPU demo path.

Every dataset yields dicts of `tokens` [s] int64, `labels` [s] int64, `loss_mask` [s] float32 and
`position_ids` [s] int64, for s = `cfg.train.seq_length`; never an attention mask.
"""

from __future__ import annotations

from megatron_longgen.config import LongGenConfig
from megatron_longgen.data.packed import build_packed_datasets
from megatron_longgen.data.tokenizers import Tokenizer


def default_num_samples(cfg: LongGenConfig) -> tuple[int, int]:
    """(train, valid) sample counts to build for an indexed blend, independent of `train.max_steps`.

    Train: one pass over the blend's training tokens, `tokens * (1 - valid_fraction) / seq_length` samples
    (at least one): the trainer's sample order (`training/data_order.py`) walks a fresh permutation of
    that set per epoch, so runs with different step budgets — or a run resumed with a larger one — read the
    same samples in the same order. Valid: `eval_iters * global_batch_size`, the batches every evaluation
    reads (always the same ones)."""
    from megatron_longgen.data.blend import parse_blend
    from megatron_longgen.data.indexed import validate_indexed_prefix

    t = cfg.train
    prefixes, _ = parse_blend(cfg.data.blend)
    tokens = sum(validate_indexed_prefix(prefix).num_tokens for prefix in prefixes)
    train = max(1, int(tokens * (1.0 - cfg.data.valid_fraction)) // t.seq_length)
    return train, t.eval_iters * t.global_batch_size


def build_datasets(
    cfg: LongGenConfig,
    *,
    tokenizer: Tokenizer,
    num_train_samples: int | None = None,
    num_valid_samples: int | None = None,
    cache_dir: str | None = None,
):
    """(train, valid-or-None) for `cfg.data`; see the module docstring for the two paths.

    Indexed path (`cfg.data.blend`): `num_train_samples` / `num_valid_samples` default to
    `default_num_samples(cfg)`; the datasets hold at least that many samples, deterministic in
    `cfg.train.seed`. `cache_dir` (else `cfg.data.cache_dir`, else next to the data) receives
    Megatron-Core's index caches. Call on every rank with torch.distributed initialised.
    Text path: the sample counts and `cache_dir` are ignored (the corpus is packed once, in order).
    Raises ValueError for missing/corrupt data (naming the file) or too little data for one sample.
    """
    if not cfg.data.blend.strip():
        return build_packed_datasets(
            cfg.data.corpus,
            tokenizer=tokenizer,
            seq_length=cfg.train.seq_length,
            valid_fraction=cfg.data.valid_fraction,
        )
    from megatron_longgen.data.megatron_gpt import build_indexed_datasets

    default_train, default_valid = default_num_samples(cfg)
    return build_indexed_datasets(
        blend=cfg.data.blend,
        tokenizer=tokenizer,
        seq_length=cfg.train.seq_length,
        seed=cfg.train.seed,
        valid_fraction=cfg.data.valid_fraction,
        num_train_samples=default_train if num_train_samples is None else num_train_samples,
        num_valid_samples=default_valid if num_valid_samples is None else num_valid_samples,
        cache_dir=cache_dir if cache_dir is not None else cfg.data.cache_dir,
    )
