"""Streaming tensor I/O between HF safetensors and a LongGen Megatron-Core dist checkpoint.

Memory: HF input is read one shard at a time (safetensors lazily, tensor by tensor); the tensors each
input shard completes are saved as one dist-checkpoint part, and the parts are merged into one checkpoint
at the end (`format.merge_dist_checkpoints`: files renamed, metadata merged). The import thus holds about
one input shard plus its converted copy. The export holds about one layer: the dist checkpoint is read
one plain key at a time (any TP/PP layout: `format.DistCheckpointReader` reshards) and safetensors shards
are written tensor by tensor (`hf_io.SafetensorsStreamWriter`).

Keys and transforms come from the table of `hf_mapping.py` and the named functions of `transforms.py`;
every HF tensor must be used and every Megatron key filled, and every shape must match the config
(`hf_config.expected_hf_shapes`). Nothing here decides where outputs go (`convert.py` does).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_longgen.checkpoint import format as ckpt_format
from megatron_longgen.checkpoint.hf_config import TORCH_DTYPES, expected_hf_shapes, transform_context
from megatron_longgen.checkpoint.hf_io import (
    HFCheckpointReader,
    SafetensorsStreamWriter,
    plan_shards,
    shard_file_names,
)
from megatron_longgen.checkpoint.hf_mapping import MAPPINGS, KeyMapping, check_coverage, expand_mapping
from megatron_longgen.checkpoint.transforms import get_transform
from megatron_longgen.config import LongGenConfig


def ensure_process_group() -> None:
    """dist_checkpointing needs torch.distributed: start a one-rank gloo group if none exists."""
    import torch.distributed as dist

    from megatron_longgen.utils.distributed import init_distributed

    if not dist.is_initialized():
        init_distributed()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled)


# --------------------------------------------------------------------------------------------------------
# HF -> Megatron-Core
# --------------------------------------------------------------------------------------------------------


def convert_hf_state(
    reader: HFCheckpointReader, cfg: LongGenConfig, *, progress: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, per HF shard, the Megatron tensors completed by it: plain key -> global tensor in
    cfg.train.dtype. A row whose HF tensors straddle two shards is completed by the later one.

    Checks that every HF tensor is used and every Megatron key filled, and every shape against the config.
    """
    from megatron_longgen.megatron_bridge import padded_vocab_size

    m = cfg.model
    table = MAPPINGS["llama"]
    rows = expand_mapping(table, num_layers=m.num_layers, tie_embeddings=m.tie_embeddings)
    check_coverage(rows=rows, hf_keys=reader.keys(), tie_embeddings=m.tie_embeddings)
    row_of: dict[str, KeyMapping] = {k: row for row in rows for k in row.hf}
    shapes = expected_hf_shapes(cfg)
    padded = padded_vocab_size(
        m.vocab_size,
        divisible_by=m.make_vocab_size_divisible_by,
        tensor_parallel=cfg.parallel.tensor_parallel,
    )
    ctx = transform_context(cfg, padded_vocab_size=padded)
    dtype = TORCH_DTYPES[cfg.train.dtype]
    pending: dict[str, torch.Tensor] = {}
    filled: set[str] = set()
    with _progress(len(reader.shard_keys), "HF shards", progress) as bar:
        for name, keys in reader.shard_keys.items():
            bar.set_postfix_str(name)
            converted: dict[str, torch.Tensor] = {}
            with reader.open_shard(name) as shard:
                for key in keys:
                    row = row_of.get(key)
                    if row is None:
                        continue  # tied lm_head or an ignorable buffer (check_coverage vetted it)
                    tensor = shard.get(key)
                    if tuple(tensor.shape) != shapes[key]:
                        raise ValueError(
                            f"config/weight shape mismatch: {key} in {shard.path} has shape "
                            f"{tuple(tensor.shape)} but config.json implies {shapes[key]}"
                        )
                    pending[key] = tensor
                    if all(k in pending for k in row.hf):
                        parts = [pending.pop(k).to(dtype) for k in row.hf]
                        converted[row.mcore] = get_transform(row.transform).to_mcore(parts, ctx).contiguous()
            filled.update(converted)
            if converted:
                yield converted
            bar.update(1)
    assert not pending and filled == {row.mcore for row in rows}, (
        "every HF key used and every Megatron key filled"
    )


def write_mcore_model(batches: Iterator[dict[str, torch.Tensor]], out: Path, *, num_layers: int) -> None:
    """Save the converted tensors of `batches` (plain key -> global tensor) as the dist checkpoint
    `out/model`: one part per batch under `out/part-*`, merged at the end. Needs a process group
    (`ensure_process_group`)."""
    from megatron.core import dist_checkpointing

    from megatron_longgen.training.guards import shield_helper_processes

    parts, layer_maps = [], []
    for batch in batches:
        # Stacked layer tensors of this part span only its own layers (slot -> layer in layer_map).
        layer_map: dict[str, list[int]] = {}
        for key in batch:
            layer, _ = ckpt_format.split_layer_key(key)
            if layer is not None:
                layer_map.setdefault(ckpt_format.sharded_key(key), []).append(layer)
        state: dict = {}
        for key in list(batch):
            layer, _ = ckpt_format.split_layer_key(key)
            slot = None
            if layer is not None:
                layers = layer_map[ckpt_format.sharded_key(key)]
                slot = (layers.index(layer), len(layers))
            state.update(
                ckpt_format.sharded_entries(key, batch.pop(key), num_layers=num_layers, stack_slot=slot)
            )
        part = out / f"part-{len(parts):05d}"
        part.mkdir()
        # A part holds the `_extra_state` objects of its own layers only: no whole-checkpoint check here
        # (loading the merged checkpoint through a model's sharded_state_dict is what the tests verify).
        with shield_helper_processes():  # Megatron-Core's writer processes die with the converter
            dist_checkpointing.save(state, str(part), validate_access_integrity=False)
        parts.append(part)
        layer_maps.append(layer_map)
        del state
    ckpt_format.merge_dist_checkpoints(
        parts, ckpt_format.model_dir(out), layer_maps=layer_maps, num_layers=num_layers
    )


# --------------------------------------------------------------------------------------------------------
# Megatron-Core -> HF
# --------------------------------------------------------------------------------------------------------


def open_mcore_model(mcore_dir, cfg: LongGenConfig) -> ckpt_format.DistCheckpointReader:
    """A reader of `DIR/model` after checking it holds every tensor `cfg` needs (ValueError otherwise)."""
    model_path = ckpt_format.model_dir(mcore_dir)
    if not (model_path / "metadata.json").is_file():
        raise FileNotFoundError(f"{model_path} is not a Megatron-Core dist checkpoint (no metadata.json)")
    reader = ckpt_format.DistCheckpointReader(model_path)
    m = cfg.model
    rows = expand_mapping(MAPPINGS["llama"], num_layers=m.num_layers, tie_embeddings=m.tie_embeddings)
    missing = sorted({ckpt_format.sharded_key(r.mcore) for r in rows} - reader.keys())
    if missing:
        raise ValueError(
            f"checkpoint {model_path} lacks {len(missing)} tensors the config needs, e.g. {missing[:5]}"
        )
    return reader


def stored_dtype(reader: ckpt_format.DistCheckpointReader, cfg: LongGenConfig) -> torch.dtype:
    """The dtype the checkpoint's layer weights are stored in."""
    rows = expand_mapping(
        MAPPINGS["llama"], num_layers=cfg.model.num_layers, tie_embeddings=cfg.model.tie_embeddings
    )
    return reader.dtype(ckpt_format.sharded_key(rows[1].mcore))


def write_hf_shards(
    reader: ckpt_format.DistCheckpointReader,
    cfg: LongGenConfig,
    out: Path,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int,
    progress: bool = False,
) -> tuple[dict[str, str], int]:
    """Write the HF tensors of the checkpoint as safetensors shards (at most `max_shard_bytes` each) into
    `out`; returns `(weight_map, total_bytes)` for the index. Partial shard files are removed on error."""
    m = cfg.model
    rows = expand_mapping(MAPPINGS["llama"], num_layers=m.num_layers, tie_embeddings=m.tie_embeddings)
    vocab_rows = reader.global_shape("embedding.word_embeddings.weight")[0]
    ctx = transform_context(cfg, padded_vocab_size=vocab_rows)
    hf_shapes = expected_hf_shapes(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(k, itemsize * int(torch.Size(hf_shapes[k]).numel())) for row in rows for k in row.hf]
    planned = plan_shards(sizes, max_shard_bytes=max_shard_bytes)
    file_names = shard_file_names(len(planned))
    file_of = {k: file_names[i] for i, keys in enumerate(planned) for k in keys}
    weight_map: dict[str, str] = {}
    total = 0
    writers: dict[str, SafetensorsStreamWriter] = {}
    done = 0
    try:
        with _progress(len(file_names), "HF shards", progress) as bar:
            for row in rows:
                parts = get_transform(row.transform).to_hf(reader.read_plain(row.mcore), ctx)
                for key, tensor in zip(row.hf, parts):
                    if tuple(tensor.shape) != hf_shapes[key]:
                        raise ValueError(
                            f"checkpoint tensor {row.mcore} gives {key} of shape {tuple(tensor.shape)}, "
                            f"but the recorded config implies {hf_shapes[key]}"
                        )
                    name = file_of[key]
                    if name not in writers:
                        planned_keys = planned[file_names.index(name)]
                        entries = [(k, hf_shapes[k], dtype) for k in planned_keys]
                        writers[name] = SafetensorsStreamWriter(
                            out / name, entries, metadata={"format": "pt"}
                        )
                    writers[name].write(key, tensor.to(dtype))
                    weight_map[key] = name
                    total += tensor.numel() * itemsize
                    if writers[name].complete:
                        writers[name].close()
                        done += 1
                        bar.set_postfix_str(name)
                        bar.update(1)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    assert done == len(planned), "every planned shard written"
    return weight_map, total
