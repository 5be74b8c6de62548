"""HF Llama <-> LongGen Megatron-Core checkpoints: the library functions behind `tools/convert_*.py`.

- `hf_to_mcore(hf_dir=..., out_dir=...)` reads `config.json` (`hf_config.py` makes the LongGenConfig) and
  streams the weights shard by shard into the folder described in `format.py` (LongGen config + a
  Megatron-Core dist checkpoint whose keys are those of `GPTModel.sharded_state_dict()`), without building
  a model (`streaming.py`).
- `mcore_to_hf(mcore_dir=..., out_dir=...)` streams that folder, one layer at a time and from any TP/PP
  layout, into safetensors shards + a `config.json` that records the LongGen layout for
  `hf_model.LongGenLlamaForCausalLM`, plus the tokenizer files (`hf_tokenizer.py`).

Outputs are built in `OUT.tmp-<host>-<pid>-*` next to OUT and renamed only when complete
(`utils.atomic_output.atomic_output_dir`); an existing OUT needs `force`, and the temporaries of killed
earlier conversions are removed on the next run.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from megatron_longgen.checkpoint import format as ckpt_format
from megatron_longgen.checkpoint.hf_config import (  # noqa: F401  (re-exported: the converter's public names)
    DEFAULT_MAX_STEPS,
    HF_DTYPE_NAMES,
    TORCH_DTYPES,
    expected_hf_shapes,
    hf_config_to_longgen,
    longgen_to_hf_config,
    read_hf_config,
    transform_context,
)
from megatron_longgen.checkpoint.hf_io import HFCheckpointReader, write_index
from megatron_longgen.checkpoint.streaming import (
    convert_hf_state,
    ensure_process_group,
    open_mcore_model,
    stored_dtype,
    write_hf_shards,
    write_mcore_model,
)
from megatron_longgen.config import LongGenConfig
from megatron_longgen.utils.atomic_output import atomic_output_dir

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _refuse_existing(out: Path, *, force: bool) -> None:
    # Checked before any work (atomic_output_dir checks again at the end of the inputs' validation).
    if out.exists() and not force:
        raise FileExistsError(f"output {out.absolute()} already exists; pass --force to replace it")


def hf_to_mcore(
    *,
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    pattern: str | None = None,
    sparse_variant: str | None = None,
    dtype: str | None = None,
    seq_length: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    overrides: tuple[str, ...] = (),
    force: bool = False,
    progress: bool = False,
) -> LongGenConfig:
    """Convert an HF Llama folder into a LongGen Megatron-Core checkpoint folder (see `format.py`).

    The recorded config carries the TP/PP sizes (the vocabulary is padded for that TP size); the dist
    checkpoint holds global tensors and loads at any layout. Returns the recorded config.
    """
    out = Path(out_dir)
    _refuse_existing(out, force=force)
    cfg = hf_config_to_longgen(
        read_hf_config(hf_dir),
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        pattern=pattern,
        sparse_variant=sparse_variant,
        dtype=dtype,
        seq_length=seq_length,
        max_steps=max_steps,
        overrides=overrides,
    )
    reader = HFCheckpointReader(hf_dir)
    with atomic_output_dir(out, force=force) as tmp:
        ensure_process_group()
        # One dist-checkpoint part per HF shard, merged at the end: memory stays at about one shard.
        write_mcore_model(
            convert_hf_state(reader, cfg, progress=progress), tmp, num_layers=cfg.model.num_layers
        )
        ckpt_format.save_config(cfg, tmp)
    return cfg


def mcore_to_hf(
    *,
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: str | None = None,
    force: bool = False,
    progress: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> dict:
    """Convert a LongGen Megatron-Core checkpoint (any TP/PP it was saved with) into an HF folder of
    safetensors shards + `config.json` (LongGen layout recorded) + tokenizer files. `dtype` None keeps the
    stored dtype; `tokenizer` None takes the config's `data.tokenizer` (see `hf_tokenizer.py`). A tokenizer
    that cannot be exported is reported through `on_warning` (default `warnings.warn`), not raised.

    Returns the written config.json as a dict.
    """
    from megatron_longgen.checkpoint.hf_tokenizer import check_explicit_tokenizer, export_tokenizer

    out = Path(out_dir)
    _refuse_existing(out, force=force)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    cfg = ckpt_format.load_config(mcore_dir)
    if tokenizer is not None:
        check_explicit_tokenizer(tokenizer, model_vocab_size=cfg.model.vocab_size)
    reader = open_mcore_model(mcore_dir, cfg)
    out_dtype = TORCH_DTYPES[dtype] if dtype is not None else stored_dtype(reader, cfg)
    with atomic_output_dir(out, force=force) as tmp:
        weight_map, total = write_hf_shards(
            reader, cfg, tmp, dtype=out_dtype, max_shard_bytes=max_shard_bytes, progress=progress
        )
        write_index(tmp, weight_map=weight_map, total_size=total)
        hf_config = longgen_to_hf_config(cfg, dtype=out_dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        exported = export_tokenizer(
            tokenizer or cfg.data.tokenizer,
            tmp,
            model_vocab_size=cfg.model.vocab_size,
            explicit=tokenizer is not None,
            max_length=cfg.train.seq_length,
        )
    for text in exported.warnings:
        (on_warning or (lambda message: warnings.warn(message, stacklevel=3)))(text)
    return hf_config
