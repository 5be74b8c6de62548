"""The on-disk layout of a LongGen Megatron-Core checkpoint, shared by the converter and the trainer.

    DIR/
      longgen_config.json   {"format_version": 1, "config": config_to_dict(cfg)}
      model/                megatron.core.dist_checkpointing.save(model.sharded_state_dict(), DIR/model)

`DIR/model` holds *global* tensors (dist_checkpointing reshards on load), so one checkpoint loads at any
TP/PP: `dist_checkpointing.load(model.sharded_state_dict(), DIR/model)`. Only the vocabulary padding depends
on TP (rows are padded to `make_vocab_size_divisible_by * tp`); the embedding and output layer are saved
with `allow_shape_mismatch`, so loading at another TP zero-fills or drops padding rows only.

Keys: Megatron stacks the layers of a block. The plain (module) key
`decoder.layers.{i}.self_attention.linear_qkv.weight` is stored under the dist-checkpoint key
`decoder.layers.self_attention.linear_qkv.weight` with global shape [num_layers, *weight.shape] and layer i
at offset i along the new leading axis; the unfused RMSNorms are renamed to Transformer Engine's fused
names (`input_layernorm.` -> `self_attention.linear_qkv.layer_norm_`, `pre_mlp_layernorm.` ->
`mlp.linear_fc1.layer_norm_`), as `models/layer_specs.py` declares. `sharded_entries` builds these entries
from plain tensors without building a model, which is what the streaming converter needs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from megatron_longgen.config import LongGenConfig, config_from_dict, config_to_dict

FORMAT_VERSION = 1
CONFIG_FILE = "longgen_config.json"
MODEL_SUBDIR = "model"

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Same renames as the `sharded_state_dict_keys_map` of the local (non-TE) layer spec.
_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
# Linear layers carry an (empty) `_extra_state` entry in GPTModel.sharded_state_dict().
_EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
# Vocabulary-sized tensors: saved with allow_shape_mismatch like GPTModel does (padding depends on TP).
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def model_dir(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / MODEL_SUBDIR


def save_config(cfg: LongGenConfig, checkpoint_dir: str | os.PathLike) -> Path:
    """Write `DIR/longgen_config.json`; returns its path."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    payload = {"format_version": FORMAT_VERSION, "config": config_to_dict(cfg)}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def load_config(checkpoint_dir: str | os.PathLike) -> LongGenConfig:
    """Read `DIR/longgen_config.json`. Raises FileNotFoundError / ValueError with the path in the message."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a LongGen Megatron-Core checkpoint folder")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this code reads version {FORMAT_VERSION}")
    return config_from_dict(payload["config"])


def is_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """True when DIR has both the config file and a dist-checkpoint `model/` folder."""
    root = Path(checkpoint_dir)
    return (root / CONFIG_FILE).is_file() and (model_dir(root) / "metadata.json").is_file()


def split_layer_key(key: str) -> tuple[int | None, str]:
    """`decoder.layers.3.mlp.linear_fc2.weight` -> (3, `mlp.linear_fc2.weight`); other keys -> (None, key)."""
    match = _LAYER_KEY.match(key)
    if match is None:
        return None, key
    return int(match.group(1)), match.group(2)


def sharded_key(key: str) -> str:
    """The dist-checkpoint key of a plain (module) key, as GPTModel.sharded_state_dict() names it."""
    layer, rest = split_layer_key(key)
    if layer is None:
        return key
    for old, new in _KEYS_MAP.items():
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return f"decoder.layers.{rest}"


def sharded_entries(
    key: str,
    tensor: torch.Tensor,
    *,
    num_layers: int,
    stack_slot: tuple[int, int] | None = None,
    replica_id: int = 0,
) -> dict:
    """ShardedTensor (+ `_extra_state` ShardedObject) entries for one plain key holding a *global* tensor.

    Layer tensors get a leading layer axis of size `num_layers` (offset = the layer index), exactly as
    Megatron's TransformerBlock stacks them. `stack_slot=(slot, count)` instead places the tensor at `slot`
    of a `count`-long axis: the converter saves a part holding only some layers that way (in a one-rank
    world torch_dist needs every chunk of a saved tensor to be present) and `merge_dist_checkpoints` puts
    the true layer offsets back. The returned dict is keyed by plain keys so several calls can be merged
    into one state dict for `dist_checkpointing.save`.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    layer, rest = split_layer_key(key)
    entries: dict = {}
    if layer is None:
        entries[key] = ShardedTensor.from_rank_offsets(
            key, tensor, replica_id=replica_id, allow_shape_mismatch=key in VOCAB_KEYS
        )
        return entries
    slot, count = stack_slot if stack_slot is not None else (layer, num_layers)
    entries[key] = ShardedTensor.from_rank_offsets(
        sharded_key(key), tensor, (0, slot, count), replica_id=replica_id, prepend_axis_num=1
    )
    module = rest.rsplit(".", 1)[0]
    if module in _EXTRA_STATE_MODULES and rest.endswith(".weight"):
        extra_key = f"decoder.layers.{layer}.{module}._extra_state"
        entries[extra_key] = ShardedObject(
            f"decoder.layers.{module}._extra_state", None, (num_layers,), (layer,), replica_id=replica_id
        )
    return entries


def merge_dist_checkpoints(
    parts: list[Path], out: Path, *, layer_maps: list[dict[str, list[int]]], num_layers: int
) -> None:
    """Merge dist checkpoints holding *disjoint* chunks of the same model into one folder `out`.

    Lets the converter save part by part (one input shard at a time) instead of holding the whole model
    for a single `dist_checkpointing.save`. Every part was written by `dist_checkpointing.save` (torch_dist
    backend) in this process. The data files are moved (renamed, not copied) into `out`; the torch DCP
    `.metadata` of the parts is merged (a stacked tensor's chunks from several parts are concatenated,
    storage entries re-pointed to the renamed files); Megatron's `metadata.json` and `common.pt` come from
    the first part (they do not depend on the tensors). `layer_maps[p][fqn]` lists the true layer of each
    slot of a stacked tensor saved with `sharded_entries(..., stack_slot=...)` in part p; those chunks get
    their layer offsets and the `num_layers` axis back. Raises ValueError if two parts hold the same chunk.
    """
    import dataclasses
    import pickle
    import shutil

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out.mkdir()
    merged = None
    file_count = 0
    if len(layer_maps) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(layer_maps)} layer maps")
    for part, layer_map in zip(parts, layer_maps):
        metadata = FileSystemReader(str(part)).read_metadata()
        renames: dict[str, str] = {}
        for name in sorted(p.name for p in part.glob("*.distcp")):
            renames[name] = f"__0_{file_count}.distcp"
            os.replace(part / name, out / renames[name])
            file_count += 1
        _restore_layer_offsets(metadata, layer_map, num_layers=num_layers)
        storage = {
            index: dataclasses.replace(info, relative_path=renames[info.relative_path])
            for index, info in metadata.storage_data.items()
        }
        if merged is None:
            merged = metadata
            merged.storage_data = storage
            for name in ("metadata.json", "common.pt"):
                if (part / name).is_file():  # megatron-core 0.19 keeps common data in the DCP files
                    shutil.copyfile(part / name, out / name)
        else:
            # megatron-core 0.19 stores the (tensor-independent) common state as a `common_state` object in
            # every part's DCP files: the first part's copy is the one kept.
            storage = {index: info for index, info in storage.items() if not _is_common_state(index.fqn)}
            clash = set(storage) & set(merged.storage_data)
            if clash:
                raise ValueError(f"dist checkpoint parts overlap, e.g. {sorted(map(str, clash))[:3]}")
            merged.storage_data.update(storage)
            for fqn, md in metadata.state_dict_metadata.items():
                if _is_common_state(fqn):
                    continue
                have = merged.state_dict_metadata.get(fqn)
                if have is None:
                    merged.state_dict_metadata[fqn] = md
                elif isinstance(have, TensorStorageMetadata):
                    if tuple(have.size) != tuple(md.size):
                        raise ValueError(
                            f"{fqn}: global shape {tuple(md.size)} in {part} != {tuple(have.size)}"
                        )
                    have.chunks.extend(md.chunks)
                else:
                    raise ValueError(f"non-tensor entry {fqn} appears in two dist checkpoint parts")
            if isinstance(merged.planner_data, dict) and isinstance(metadata.planner_data, dict):
                merged.planner_data.update(metadata.planner_data)
        shutil.rmtree(part)
    assert merged is not None, "at least one part"
    with open(out / ".metadata", "wb") as handle:
        pickle.dump(merged, handle)


def _is_common_state(fqn: str) -> bool:
    """Megatron-Core 0.19's ShardedObject("common_state") entry (saved as `common_state/shard_0_1`)."""
    return fqn.split("/", 1)[0] == "common_state"


def _restore_layer_offsets(metadata, layer_map: dict[str, list[int]], *, num_layers: int) -> None:
    """In one part's DCP metadata, turn slot offsets of stacked tensors back into layer offsets."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    def to_layer(fqn: str, offsets) -> torch.Size:
        return torch.Size((layer_map[fqn][offsets[0]], *offsets[1:]))

    for fqn in layer_map:
        md = metadata.state_dict_metadata[fqn]
        md.size = torch.Size((num_layers, *md.size[1:]))
        md.chunks = [ChunkStorageMetadata(offsets=to_layer(fqn, c.offsets), sizes=c.sizes) for c in md.chunks]
    metadata.storage_data = {
        (
            MetadataIndex(index.fqn, to_layer(index.fqn, index.offset)) if index.fqn in layer_map else index
        ): info
        for index, info in metadata.storage_data.items()
    }


class DistCheckpointReader:
    """Read parts of the global tensors of a `DIR/model` dist checkpoint, without a process group.

    Megatron's own `dist_checkpointing.load` cannot read a slice in a one-rank world (torch_dist treats
    every chunk as local), so the exporter reads through torch.distributed.checkpoint's storage reader and
    its resharding helper: any set of saved chunks (any TP/PP layout) is copied into the requested slice.
    """

    def __init__(self, model_path: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(model_path)
        self._reader = FileSystemReader(str(self.path))
        self.metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, True)

    def keys(self) -> set[str]:
        return set(self.metadata.state_dict_metadata)

    def global_shape(self, fqn: str) -> tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[fqn].size)

    def dtype(self, fqn: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[fqn].properties.dtype

    def read(self, fqn: str, *, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The block [offsets, offsets + sizes) of global tensor `fqn`."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        target = torch.empty(sizes, dtype=self.dtype(fqn))
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        covered = sum(int(torch.Size(item.lengths).numel()) for item in items)
        if covered != target.numel():
            raise ValueError(
                f"{self.path}: saved chunks of {fqn} cover {covered} of the "
                f"{target.numel()} requested elements"
            )
        self._reader.read_data(LoadPlan(items), _SliceTarget(target)).wait()
        return target

    def read_plain(self, key: str) -> torch.Tensor:
        """The global tensor of one plain key: one layer's slice of a stacked layer tensor, or the whole
        tensor of a non-layer key."""
        layer, _ = split_layer_key(key)
        fqn = sharded_key(key)
        shape = self.global_shape(fqn)
        if layer is None:
            return self.read(fqn, offsets=(0,) * len(shape), sizes=shape)
        if layer >= shape[0]:
            raise ValueError(f"{self.path}: {fqn} stacks {shape[0]} layers, layer {layer} requested")
        block = self.read(fqn, offsets=(layer,) + (0,) * (len(shape) - 1), sizes=(1,) + shape[1:])
        return block[0]


class _SliceTarget:
    """The minimal LoadPlanner surface FileSystemReader.read_data uses: where each read lands."""

    def __init__(self, target: torch.Tensor):
        self.target = target

    def resolve_tensor(self, req) -> torch.Tensor:
        view = self.target
        for dim, (start, length) in enumerate(zip(req.dest_offsets, req.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, req, tensor) -> None:
        return None

    def load_bytes(self, req, value) -> None:
        raise AssertionError(f"unexpected byte item {req.storage_index} in a tensor read")
