"""Train/valid datasets from Megatron-Core indexed datasets, through `BlendedMegatronDatasetBuilder`.

Design choices:
- Megatron-Core's `GPTDataset` does the packing: documents (each `[<bos>, ...]`, from
  `tools/preprocess_data.py`) are shuffled per epoch with the seed, concatenated, and cut into samples of
  `seq_length + 1` tokens (inputs/labels shifted by one), at any length up to 128K and beyond. Position ids
  run 0..s-1 and no attention reset happens at document boundaries (Fu et al. 2024 / LongGen), so
  `reset_position_ids`, `reset_attention_mask` and `eod_mask_loss` are all False.
- `create_attention_mask=False`: an [s, s] mask would cost s^2 memory at 128K; the attention modules build
  their own masks.
- Several prefixes are blended by `BlendedDataset` with explicit weights: the user's, or each prefix's
  token count when the blend has none (Megatron-Core would otherwise cap the train set at one epoch).
- Each prefix is split by documents into train/valid with `valid_fraction` (Megatron's "train,valid,test"
  split string, test = 0). Up-sampled copies of one document are adjacent in the file, so at most the one
  document on the split boundary can have copies on both sides.
- Index caches (document/sample/shuffle `.npy` files, keyed by a hash of everything that affects them)
  go to `cache_dir`; rank 0 builds them and the other ranks load them after a barrier.
- `torch.distributed` must be initialised, even for one process: BlendedDataset asks for the rank.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from megatron_longgen.data.blend import parse_blend
from megatron_longgen.data.indexed import read_document_lengths, validate_indexed_prefix
from megatron_longgen.data.tokenizers import Tokenizer

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class MegatronTokenizerView:
    """The duck-typed tokenizer Megatron-Core's GPTDataset needs (`eod`, `pad`, `vocab_size`,
    `unique_identifiers`). `pad` is -1, an id no dataset contains: our tokenizers have no pad token, and
    reusing `eod` would make Megatron warn and mask real tokens if padding ever happened."""

    def __init__(self, tokenizer: Tokenizer):
        self.eod = tokenizer.eod
        self.pad = -1
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = dict(tokenizer.unique_identifiers)


class MegatronSamples(torch.utils.data.Dataset):
    """A Megatron-Core GPTDataset or BlendedDataset seen through our sample contract: dicts of `tokens` [s]
    int64, `labels` [s] int64, `loss_mask` [s] float32, `position_ids` [s] int64 (Megatron's extra keys,
    such as BlendedDataset's `dataset_id`, are dropped)."""

    def __init__(self, inner: torch.utils.data.Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self.inner):
            raise IndexError(f"sample {idx} out of range [0, {len(self.inner)})")
        sample = self.inner[idx]
        return {key: sample[key] for key in SAMPLE_KEYS}


def _check_tokenizer_matches(prefix: str, *, tokenizer: Tokenizer) -> None:
    """Compare the tokenizer recorded in `prefix.stats.json` (when present) with the run's tokenizer."""
    stats_path = prefix + ".stats.json"
    if not os.path.isfile(stats_path):
        return
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    recorded = (stats.get("vocab_size"), stats.get("bos_id"))
    if recorded != (tokenizer.vocab_size, tokenizer.bos_id):
        raise ValueError(
            f"{prefix} was tokenized with {stats.get('tokenizer')!r} (vocab_size {recorded[0]}, "
            f"bos {recorded[1]}), but the run's tokenizer {tokenizer.spec!r} has vocab_size "
            f"{tokenizer.vocab_size}, bos {tokenizer.bos_id}"
        )


def _check_split_tokens(prefixes: list[str], *, split: str, seq_length: int) -> None:
    """Raise ValueError when the train or valid documents of a prefix cannot fill one sample.

    Megatron-Core would loop for ever adding epochs of an empty split, so the split is recomputed here
    with its own functions and rounding (documents [round(beg * n), round(end * n)) of each prefix).
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        lengths = read_document_lengths(prefix)
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        for name, bookends in zip(("train", "valid"), matrix):
            if bookends is None:
                continue
            beg, end = (round(b * float(lengths.size)) for b in bookends)
            num_tokens = int(starts[end] - starts[beg])
            if num_tokens <= seq_length:
                raise ValueError(
                    f"the {name} split of {prefix} (documents {beg}..{end} of {lengths.size}) holds "
                    f"{num_tokens} tokens: too few for one sample of seq_length {seq_length} (+1 for the "
                    f"labels); use more data, a shorter seq_length or another valid_fraction "
                    f"(0 disables the split)"
                )


def build_indexed_datasets(
    *,
    blend: str,
    tokenizer: Tokenizer,
    seq_length: int,
    seed: int,
    valid_fraction: float,
    num_train_samples: int,
    num_valid_samples: int,
    cache_dir: str | None,
) -> tuple[MegatronSamples, MegatronSamples | None]:
    """(train, valid-or-None) with at least `num_train_samples` / `num_valid_samples` samples of `seq_length`
    (Megatron-Core builds whole epochs of a single prefix, so a lone GPTDataset may hold more). The valid
    dataset is None when `valid_fraction` or `num_valid_samples` is 0; the train documents do not change.

    Must be called on every rank (rank 0 builds the index caches first). `cache_dir` None puts them in
    `<directory of the first prefix>/longgen_index_cache`. Raises ValueError for a malformed blend, a
    missing, corrupt or truncated `.bin/.idx` (naming the file), a prefix whose train or valid split
    cannot fill one sample, a `PREFIX.stats.json` recording another tokenizer, or a uint16 dataset with a
    tokenizer of more than 65,536 ids; RuntimeError when torch.distributed is not initialised.
    """
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if not dist.is_initialized():
        raise RuntimeError(
            "building Megatron-Core datasets needs torch.distributed initialised (even for one process): "
            "call megatron_longgen.utils.distributed.init_distributed() first"
        )
    if num_train_samples < 1 or num_valid_samples < 0:
        raise ValueError(
            f"need num_train_samples >= 1 and num_valid_samples >= 0, got {num_train_samples} and "
            f"{num_valid_samples}"
        )
    prefixes, weights = parse_blend(blend)
    infos = [validate_indexed_prefix(p) for p in prefixes]
    for info in infos:
        if info.num_tokens <= seq_length:
            raise ValueError(
                f"indexed dataset {info.prefix} holds {info.num_tokens} tokens: too few for one sample of "
                f"seq_length {seq_length} (+1 for the labels)"
            )
        if np.dtype(info.dtype).itemsize == 2 and tokenizer.vocab_size > 65536:
            raise ValueError(
                f"indexed dataset {info.prefix} stores uint16 tokens but the tokenizer has "
                f"{tokenizer.vocab_size} ids: it was written with another tokenizer"
            )
    for prefix in prefixes:
        _check_tokenizer_matches(prefix, tokenizer=tokenizer)
    # Fixed-point: Megatron's split parser reads digits and dots only (1e-05 would become 1 and 05).
    split = f"{1.0 - valid_fraction:.8f},{valid_fraction:.8f},0"
    _check_split_tokens(prefixes, split=split, seq_length=seq_length)
    if len(prefixes) == 1:
        weights = None  # a single GPTDataset; Megatron would otherwise wrap it in a BlendedDataset
    elif weights is None:
        weights = [float(info.num_tokens) for info in infos]
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "longgen_index_cache")
    num_valid = num_valid_samples if valid_fraction > 0 else 0
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=MegatronTokenizerView(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, num_valid, 0], lambda: True, config
    ).build()
    if train is None or len(train) == 0:
        raise ValueError(f"blend {blend!r} with valid_fraction {valid_fraction} leaves no training documents")
    valid_out = MegatronSamples(valid) if valid is not None and num_valid > 0 and len(valid) > 0 else None
    return MegatronSamples(train), valid_out
