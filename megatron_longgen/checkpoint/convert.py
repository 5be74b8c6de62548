"""HF Llama <-> LongGen Megatron-Core checkpoints: the library functions behind `tools/convert_*.py`.

- `hf_to_mcore(hf_dir=..., out_dir=...)` reads `config.json` and the weights shard by shard, maps keys with
  the table of `hf_mapping.py` and the transforms of `transforms.py`, and writes the folder described in
  `format.py` (LongGen config + a Megatron-Core dist checkpoint whose keys are those of
  `GPTModel.sharded_state_dict()`), without building a model.
- `mcore_to_hf(mcore_dir=..., out_dir=...)` reads that folder one layer at a time (dist_checkpointing
  reshards, so any TP/PP layout works) and writes safetensors shards + a `config.json` that records the
  LongGen layout for `hf_model.LongGenLlamaForCausalLM`.

Memory: HF input is read one shard at a time (safetensors lazily, tensor by tensor); the tensors each
input shard completes are saved as one dist-checkpoint part, and the parts are merged into one checkpoint
at the end (`format.merge_dist_checkpoints`: files renamed, metadata merged). The import thus holds about
one input shard plus its converted copy. The export holds about one layer: safetensors shards are
written tensor by tensor (`hf_io.SafetensorsStreamWriter`).
Outputs are built in `OUT.tmp-*` next to OUT and renamed only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_longgen.checkpoint import format as ckpt_format
from megatron_longgen.checkpoint.hf_io import (
    HFCheckpointReader,
    SafetensorsStreamWriter,
    plan_shards,
    shard_file_names,
    write_index,
)
from megatron_longgen.checkpoint.hf_mapping import (
    MAPPINGS,
    SUPPORTED_ARCHITECTURES,
    KeyMapping,
    check_coverage,
    expand_mapping,
)
from megatron_longgen.checkpoint.transforms import TransformContext, get_transform
from megatron_longgen.config import (
    LongGenConfig,
    ModelConfig,
    ParallelConfig,
    SparseAttentionConfig,
    TrainingConfig,
    apply_overrides,
)
from megatron_longgen.models.layer_pattern import default_layer_pattern, full_pattern

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_STEPS = 1000
"""`train.max_steps` recorded by the importer. The paper's stage is ~5B tokens; at 128K-token sequences and
a global batch of 32 that is ~1,200 steps, so 1000 is a sensible order of magnitude. Recipes and the
trainer override it (`--max-steps` or `--override train.max_steps=N`)."""
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


# --------------------------------------------------------------------------------------------------------
# Config translation
# --------------------------------------------------------------------------------------------------------


def _rope(hf: dict) -> dict:
    """ModelConfig RoPE fields from either the transformers v4 (`rope_theta` + `rope_scaling`) or v5
    (`rope_parameters`) layout: raised base only (`default`), position interpolation (`linear`) or YaRN."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type") or merged.get("type") or "default"
    factor = float(merged.get("factor", 1.0))
    if kind == "default":
        return dict(rotary_base=theta, rope_scaling="none", rope_scaling_factor=1.0)
    if kind == "linear":
        return dict(rotary_base=theta, rope_scaling="linear", rope_scaling_factor=factor)
    if kind == "yarn":
        unsupported = {k: merged[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if merged.get(k) is not None}
        if unsupported or merged.get("truncate", True) is False:
            raise ValueError(
                f"YaRN options {unsupported or {'truncate': False}} are not supported (only the default "
                "attention factor 0.1*ln(factor)+1 with truncated correction range)"
            )
        return dict(
            rotary_base=theta,
            rope_scaling="yarn",
            rope_scaling_factor=factor,
            rope_original_max_position=int(
                merged.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096)
            ),
            yarn_beta_fast=float(merged.get("beta_fast", 32.0)),
            yarn_beta_slow=float(merged.get("beta_slow", 1.0)),
        )
    raise ValueError(f"unsupported RoPE scaling {kind!r} in config.json (supported: default, linear, yarn)")


def hf_config_to_longgen(
    hf: dict,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    pattern: str | None = None,
    sparse_variant: str | None = None,
    dtype: str | None = None,
    seq_length: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    overrides: tuple[str, ...] = (),
    name: str = "converted_hf_llama",
) -> LongGenConfig:
    """A LongGenConfig for an HF Llama `config.json` (as a dict).

    pattern: None -> the `longgen.layer_pattern` recorded by our exporter, else the LongGen default (middle
    third full); `"full"` -> all full layers; otherwise an explicit `S`/`F` string. `dtype` None -> the HF
    config's dtype when it is fp32/bf16/fp16, else bf16. `seq_length` None -> `max_position_embeddings`.
    Raises ValueError for unsupported architectures or options, naming the value.
    """
    archs = hf.get("architectures") or []
    if hf.get("model_type") not in ("llama", "longgen_llama") or not any(
        a in SUPPORTED_ARCHITECTURES for a in archs
    ):
        raise ValueError(
            f"unsupported architecture {archs} (model_type {hf.get('model_type')!r}); "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"config.json sets {flag}=true; Llama-2 (and this converter) has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (Llama uses silu)")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            f"head_dim {head_dim} * num_attention_heads {heads} != hidden_size {hidden} is not supported"
        )
    rope = {"rope_original_max_position": hf.get("max_position_embeddings", 4096), **_rope(hf)}
    num_layers = hf["num_hidden_layers"]
    recorded = hf.get("longgen") or {}
    if pattern is None:
        layer_pattern = recorded.get("layer_pattern") or default_layer_pattern(num_layers)
    elif pattern == "full":
        layer_pattern = full_pattern(num_layers)
    elif pattern == "default":
        layer_pattern = default_layer_pattern(num_layers)
    else:
        layer_pattern = pattern
    if dtype is None:
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype")
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(hf_dtype, "bf16")
    sparse_fields = {
        k: v for k, v in recorded.items() if k in {f.name for f in dataclasses.fields(SparseAttentionConfig)}
    }
    if sparse_variant is not None:
        sparse_fields["variant"] = sparse_variant
        if "S" not in layer_pattern:
            warnings.warn(
                f"sparse variant {sparse_variant!r} has no effect: layer pattern {layer_pattern!r} has no sparse layers",
                stacklevel=2,
            )
    cfg = LongGenConfig(
        name=name,
        model=ModelConfig(
            num_layers=num_layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            layer_pattern=layer_pattern,
            **rope,
            norm_epsilon=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ),
        sparse=SparseAttentionConfig(**sparse_fields),
        parallel=ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel),
        train=TrainingConfig(
            seq_length=seq_length or hf.get("max_position_embeddings", 4096), max_steps=max_steps, dtype=dtype
        ),
    )
    return apply_overrides(cfg, list(overrides))


def longgen_to_hf_config(cfg: LongGenConfig, *, dtype: torch.dtype) -> dict:
    """`config.json` for the exported folder: LlamaConfig fields plus a `longgen` section (per-layer layout
    and sparse parameters) read by `hf_model.LongGenLlamaConfig`."""
    m, s = cfg.model, cfg.sparse
    rope = {
        "rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling,
        "rope_theta": m.rotary_base,
    }
    if m.rope_scaling in ("linear", "yarn"):
        rope["factor"] = m.rope_scaling_factor
    if m.rope_scaling == "yarn":
        rope.update(
            original_max_position_embeddings=m.rope_original_max_position,
            beta_fast=m.yarn_beta_fast,
            beta_slow=m.yarn_beta_slow,
        )
    return {
        "architectures": ["LongGenLlamaForCausalLM"],
        "model_type": "longgen_llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.train.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base,
        "rope_parameters": rope,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": HF_DTYPE_NAMES[dtype],
        "longgen": {"layer_pattern": m.layer_pattern, **dataclasses.asdict(s)},
    }


def transform_context(cfg: LongGenConfig, *, padded_vocab_size: int) -> TransformContext:
    m = cfg.model
    return TransformContext(
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.kv_heads,
        head_dim=m.head_dim,
        vocab_size=m.vocab_size,
        padded_vocab_size=padded_vocab_size,
    )


def expected_hf_shapes(cfg: LongGenConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the config implies (to catch config/weight mismatches by name)."""
    m = cfg.model
    h, d, f, v = m.hidden_size, m.head_dim, m.ffn_hidden_size, m.vocab_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (m.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (m.kv_heads * d, h),
        "self_attn.v_proj.weight": (m.kv_heads * d, h),
        "self_attn.o_proj.weight": (h, m.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(m.num_layers):
        shapes.update({f"model.layers.{layer}.{k}": s for k, s in per_layer.items()})
    return shapes


# --------------------------------------------------------------------------------------------------------
# Output folders: build in OUT.tmp-*, rename when complete
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out_dir`; on success it replaces `out_dir`, on error it is
    deleted (no partial output). An existing `out_dir` raises FileExistsError unless `force`."""
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"output {out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700; the final folder gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


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


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an HF checkpoint folder needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


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
    if out.exists() and not force:
        raise FileExistsError(f"output {out.absolute()} already exists; pass --force to replace it")
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
        from megatron.core import dist_checkpointing

        from megatron_longgen.training.guards import shield_helper_processes

        # One dist-checkpoint part per HF shard, merged at the end: memory stays at about one shard.
        parts, layer_maps = [], []
        num_layers = cfg.model.num_layers
        for batch in convert_hf_state(reader, cfg, progress=progress):
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
            part = tmp / f"part-{len(parts):05d}"
            part.mkdir()
            # A part holds the `_extra_state` objects of its own layers only: no whole-checkpoint check here
            # (loading the merged checkpoint through a model's sharded_state_dict is what the tests verify).
            with shield_helper_processes():  # Megatron-Core's writer processes die with the converter
                dist_checkpointing.save(state, str(part), validate_access_integrity=False)
            parts.append(part)
            layer_maps.append(layer_map)
            del state
        ckpt_format.merge_dist_checkpoints(
            parts, ckpt_format.model_dir(tmp), layer_maps=layer_maps, num_layers=num_layers
        )
        ckpt_format.save_config(cfg, tmp)
    return cfg


# --------------------------------------------------------------------------------------------------------
# Megatron-Core -> HF
# --------------------------------------------------------------------------------------------------------


def mcore_to_hf(
    *,
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Convert a LongGen Megatron-Core checkpoint (any TP/PP it was saved with) into an HF folder of
    safetensors shards + `config.json` (LongGen layout recorded). `dtype` None keeps the stored dtype.
    Returns the written config.json as a dict."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"output {out.absolute()} already exists; pass --force to replace it")
    cfg = ckpt_format.load_config(mcore_dir)
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
    vocab_rows = reader.global_shape("embedding.word_embeddings.weight")[0]
    ctx = transform_context(cfg, padded_vocab_size=vocab_rows)
    stored_dtype = reader.dtype(ckpt_format.sharded_key(rows[1].mcore))
    out_dtype = TORCH_DTYPES[dtype] if dtype is not None else stored_dtype
    hf_shapes = expected_hf_shapes(cfg)
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    sizes = [(k, itemsize * int(torch.Size(hf_shapes[k]).numel())) for row in rows for k in row.hf]
    planned = plan_shards(sizes, max_shard_bytes=max_shard_bytes)
    file_names = shard_file_names(len(planned))
    file_of = {k: file_names[i] for i, keys in enumerate(planned) for k in keys}
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_output_dir(out, force=force) as tmp:
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
                            entries = [(k, hf_shapes[k], out_dtype) for k in planned_keys]
                            writers[name] = SafetensorsStreamWriter(
                                tmp / name, entries, metadata={"format": "pt"}
                            )
                        writers[name].write(key, tensor.to(out_dtype))
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
        write_index(tmp, weight_map=weight_map, total_size=total)
        hf_config = longgen_to_hf_config(cfg, dtype=out_dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return hf_config
