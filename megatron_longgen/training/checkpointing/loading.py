"""Loading training checkpoints: the full resume state (`load_training_checkpoint`) or the weights
only (`load_model_weights`, e.g. a converted HF checkpoint). Both reshard to the running TP/PP.

Pick the checkpoint first with `manifest.select_resume_checkpoint` (newest intact one); data that still
cannot be read (a checkpoint from before manifests, or one verified without checksums) raises a
CorruptCheckpointError naming the file or part, not a deserializer's traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longgen.checkpoint.format import CONFIG_FILE, load_config, model_dir
from megatron_longgen.config import LongGenConfig
from megatron_longgen.training.checkpointing.layout import OPTIM_SUBDIR, TRAINER_STATE_FILE, rng_file
from megatron_longgen.training.checkpointing.manifest import CorruptCheckpointError
from megatron_longgen.training.checkpointing.state import (
    cfg_parallel_sizes,
    load_model_state,
    materialize_adam_state,
    model_sharded_state_dict,
    optimizer_metadata,
    restore_adam_steps,
    saved_adam_steps,
    set_rng_state,
)


def _one_line(err: BaseException) -> str:
    """`Type: first line` of an exception; for torch's CheckpointException, of each rank's failure."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = {_one_line(pair[0] if isinstance(pair, tuple) else pair) for pair in failures.values()}
        return "; ".join(sorted(inner)) + f" (ranks {sorted(failures)})"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _read_part(ckpt: Path, part: str, read):
    """`read()`, with a failure to read checkpoint data turned into a CorruptCheckpointError naming the
    part (a damaged .distcp surfaces as EOFError, "invalid load key", a CheckpointException...)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return read()
    except (CorruptCheckpointError, torch.OutOfMemoryError):  # not the checkpoint's fault
        raise
    except (
        OSError,
        EOFError,
        RuntimeError,
        ValueError,
        KeyError,
        CheckpointingException,
        CheckpointException,
    ) as err:  # CheckpointException derives from BaseException
        raise CorruptCheckpointError(ckpt, part, f"cannot be loaded ({_one_line(err)})") from err


def load_training_checkpoint(
    checkpoint_dir: str | os.PathLike, *, model_chunks, optimizer=None, scheduler=None
) -> dict:
    """Collective: restore model, optimizer, scheduler and (same world size only) RNG from a folder
    written by `CheckpointSaver`; returns its trainer_state.json.

    The model and optimizer reshard to the current TP/PP. RNG streams are per rank, so they are only
    restored when the world size matches (otherwise each rank keeps its fresh seed). Unreadable data
    raises CorruptCheckpointError naming the file or part (run `verify_checkpoint` first to fall back to
    an older checkpoint instead).
    """
    from megatron.core import dist_checkpointing

    ckpt = Path(checkpoint_dir)
    state_path = ckpt / TRAINER_STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} not found: {ckpt} is not a complete training checkpoint")
    try:
        state = json.loads(state_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(ckpt, TRAINER_STATE_FILE, f"is not valid JSON ({err})") from err
    try:
        load_config(ckpt)  # validates the format version
    except (ValueError, FileNotFoundError) as err:
        raise CorruptCheckpointError(ckpt, CONFIG_FILE, str(err)) from err
    loaded = _read_part(
        ckpt,
        "model",
        lambda: dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(model_dir(ckpt))),
    )
    load_model_state(model_chunks, loaded)
    if optimizer is not None:
        optim_path = ckpt / OPTIM_SUBDIR
        if not (optim_path / "metadata.json").is_file():
            raise FileNotFoundError(
                f"{optim_path} has no optimizer state; cannot resume training from {ckpt}"
            )
        fmt = state.get("optimizer_checkpoint_format", "dp_reshardable")
        saved = state.get("parallel", {})
        now = {"tensor_parallel": cfg_parallel_sizes()[0], "pipeline_parallel": cfg_parallel_sizes()[1]}
        moved = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) not in (None, v)}
        # Only the distributed optimizer's dp_reshardable layout is tied to TP/PP; the others hold global tensors.
        if fmt == "dp_reshardable" and state.get("distributed_optimizer", True) and moved:
            raise ValueError(
                f"{ckpt} saved its optimizer state as dp_reshardable at "
                + ", ".join(f"{k} {a}" for k, (a, _) in moved.items())
                + "; it cannot resume at "
                + ", ".join(f"{k} {b}" for k, (_, b) in moved.items())
                + ". Start from its weights instead (--init-checkpoint), or save with "
                "train.optimizer_checkpoint_format=fully_reshardable"
            )
        materialize_adam_state(optimizer)
        if fmt == "fully_reshardable":
            from megatron_longgen.patches.distrib_optimizer_step import patch_fully_reshardable_step

            patch_fully_reshardable_step()
        request = optimizer.sharded_state_dict(
            model_sharded_state_dict(model_chunks), is_loading=True, metadata=optimizer_metadata(fmt)
        )
        loaded_optim = _read_part(
            ckpt, OPTIM_SUBDIR, lambda: dist_checkpointing.load(request, str(optim_path))
        )
        steps = saved_adam_steps(optimizer, loaded_optim)
        with torch.no_grad():  # the state is copied into views of the (leaf) parameters
            optimizer.load_state_dict(loaded_optim)
        restore_adam_steps(optimizer, steps)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rank_rng = rng_file(ckpt, dist.get_rank())
    if state.get("world_size") == dist.get_world_size() and rank_rng.is_file():
        rel = rank_rng.relative_to(ckpt).as_posix()
        set_rng_state(_read_part(ckpt, rel, lambda: torch.load(rank_rng, weights_only=False)))
    return state


def load_model_weights(checkpoint_dir: str | os.PathLike, *, model_chunks) -> LongGenConfig:
    """Collective: load only `DIR/model` (e.g. a converted HF checkpoint) into the model chunks,
    resharding to the current TP/PP; returns the checkpoint's config for compatibility checks."""
    from megatron.core import dist_checkpointing

    ckpt = Path(checkpoint_dir)
    ckpt_cfg = load_config(ckpt)
    loaded = _read_part(
        ckpt,
        "model",
        lambda: dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(model_dir(ckpt))),
    )
    load_model_state(model_chunks, loaded)
    return ckpt_cfg
