"""Training checkpoints: Megatron-Core distributed checkpoints, atomically published, last K kept.

Layout (the model part is `checkpoint/format.py`'s, shared with the HF converter, so a training
checkpoint is also a valid converter/inference checkpoint):

    RUN_DIR/checkpoints/
      latest                  text: the name of the newest complete checkpoint ("step_0000100")
      step_0000100/
        longgen_config.json   {"format_version": 1, "config": ...}     (checkpoint.format.save_config)
        model/                dist checkpoint of model.sharded_state_dict()   (global tensors: any TP/PP)
        optim/                dist checkpoint of optimizer.sharded_state_dict(model_sd)
        rng/rank_00000.pt     per-rank RNG states (python, numpy, torch, CUDA, Megatron's tracker)
        trainer_state.json    step, LR-scheduler state, NaN-skip counter, world layout
      .tmp_step_0000200/      a save in progress (ignored by readers; removed by the next save)

Publishing: all ranks write into `.tmp_step_N`, a barrier, then rank 0 writes `trainer_state.json`
last, renames the folder to `step_N` (an atomic `os.replace` on one file system) and rewrites `latest`
through a temporary file + `os.replace`. A process killed at any point leaves either the previous
`latest` or the new one, both complete. Rotation deletes the oldest complete checkpoints beyond K only
after the new one is published.

Data-iterator state is the step number alone: the trainer's sample order is a pure function of
(seed, step) (`trainer.SampleOrder`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longgen.checkpoint.format import load_config, model_dir, save_config
from megatron_longgen.config import LongGenConfig
from megatron_longgen.training.guards import shield_helper_processes

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIM_SUBDIR = "optim"
RNG_SUBDIR = "rng"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def _unwrap(model_chunks) -> list:
    return [getattr(m, "module", m) for m in model_chunks]


def model_sharded_state_dict(model_chunks) -> dict:
    """One sharded state dict for all model chunks (virtual pipeline chunks nest under `vpN`; the
    ShardedTensor keys are global, so the files do not depend on the layout)."""
    chunks = _unwrap(model_chunks)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"vp{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(model_chunks, state: dict) -> None:
    chunks = _unwrap(model_chunks)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"vp{i}"])


def _rng_state() -> dict:
    import numpy as np
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def complete_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Published checkpoints (`step_N` folders holding trainer_state.json), oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    root = Path(checkpoints_dir)
    marker = root / LATEST_FILE
    if marker.is_file():
        named = root / marker.read_text().strip()
        if _STEP_DIR.match(named.name) and (named / TRAINER_STATE_FILE).is_file():
            return named
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def save_training_checkpoint(
    *,
    checkpoints_dir: str | os.PathLike,
    step: int,
    cfg: LongGenConfig,
    model_chunks,
    optimizer=None,
    scheduler=None,
    extra_state: dict | None = None,
    keep_last: int = 0,
) -> Path:
    """Collective (every rank calls it): save everything needed to resume after `step` steps.

    Returns the published folder `checkpoints_dir/step_N`. `extra_state` (JSON-serialisable) lands in
    trainer_state.json. `keep_last` > 0 deletes older complete checkpoints beyond that many.
    """
    from megatron.core import dist_checkpointing

    root = Path(checkpoints_dir)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp_{checkpoint_name(step)}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / RNG_SUBDIR).mkdir()
        if optimizer is not None:
            (tmp / OPTIM_SUBDIR).mkdir()
    dist.barrier()
    model_sd = model_sharded_state_dict(model_chunks)
    # Slurm signals every process of a step: the writer processes Megatron-Core starts must survive it.
    with shield_helper_processes():
        dist_checkpointing.save(model_sd, str(model_dir(tmp)))
    optim_metadata = _optimizer_metadata(cfg.train.optimizer_checkpoint_format)
    if optimizer is not None:
        optim_sd = optimizer.sharded_state_dict(model_sharded_state_dict(model_chunks), metadata=optim_metadata)
        with shield_helper_processes():
            dist_checkpointing.save(optim_sd, str(tmp / OPTIM_SUBDIR))
    torch.save(_rng_state(), tmp / RNG_SUBDIR / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        save_config(cfg, tmp)
        state = {
            "step": step,
            "world_size": dist.get_world_size(),
            "parallel": {
                "tensor_parallel": cfg.parallel.tensor_parallel,
                "pipeline_parallel": cfg.parallel.pipeline_parallel,
                "context_parallel": cfg.parallel.context_parallel,
            },
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "optimizer_checkpoint_format": cfg.train.optimizer_checkpoint_format,
            "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
            **(extra_state or {}),
        }
        _write_text_atomic(tmp / TRAINER_STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
        if final.exists():  # re-saving the same step (e.g. exit right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST_FILE, final.name + "\n")
        if keep_last > 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _optimizer_metadata(fmt: str) -> dict:
    """Megatron-Core's sharding choice for DistributedOptimizer state (other optimizers ignore it). Its
    default in 0.16.1, `fully_sharded_model_space`, fails to save at DP > 1 ("ShardedTensor.flattened_range
    is not supported"), so the format is always named explicitly."""
    return {"distrib_optim_sharding_type": fmt}


def _materialize_adam_state(optimizer) -> None:
    """Give a fresh torch Adam zero moments and step 0 before a checkpoint is loaded into it.

    Megatron-Core's DistributedOptimizer builds its load request from `state_dict()`, which (without apex or
    Transformer Engine) reads each parameter's `step` and fails on an optimizer that never stepped. The
    placeholders are overwritten by the loaded state.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def cfg_parallel_sizes() -> tuple[int, int]:
    """(TP, PP) of the running job, from Megatron-Core's parallel state."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def read_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    """`DIR/trainer_state.json` of a published checkpoint; ValueError naming the file when unreadable."""
    path = Path(checkpoint_dir) / TRAINER_STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def load_training_checkpoint(
    checkpoint_dir: str | os.PathLike, *, model_chunks, optimizer=None, scheduler=None
) -> dict:
    """Collective: restore model, optimizer, scheduler and (same world size only) RNG from a folder
    written by `save_training_checkpoint`; returns its trainer_state.json.

    The model and optimizer reshard to the current TP/PP. RNG streams are per rank, so they are only
    restored when the world size matches (otherwise each rank keeps its fresh seed).
    """
    from megatron.core import dist_checkpointing

    ckpt = Path(checkpoint_dir)
    state_path = ckpt / TRAINER_STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} not found: {ckpt} is not a complete training checkpoint")
    state = json.loads(state_path.read_text())
    load_config(ckpt)  # validates the format version
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(model_dir(ckpt)))
    _load_model_state(model_chunks, loaded)
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
        _materialize_adam_state(optimizer)
        if fmt == "fully_reshardable":
            from megatron_longgen.patches.distrib_optimizer_step import patch_fully_reshardable_step

            patch_fully_reshardable_step()
        request = optimizer.sharded_state_dict(
            model_sharded_state_dict(model_chunks), is_loading=True, metadata=_optimizer_metadata(fmt)
        )
        loaded_optim = dist_checkpointing.load(request, str(optim_path))
        with torch.no_grad():  # the state is copied into views of the (leaf) parameters
            optimizer.load_state_dict(loaded_optim)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng_file = ckpt / RNG_SUBDIR / f"rank_{dist.get_rank():05d}.pt"
    if state.get("world_size") == dist.get_world_size() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def load_model_weights(checkpoint_dir: str | os.PathLike, *, model_chunks) -> LongGenConfig:
    """Collective: load only `DIR/model` (e.g. a converted HF checkpoint) into the model chunks,
    resharding to the current TP/PP; returns the checkpoint's config for compatibility checks."""
    from megatron.core import dist_checkpointing

    ckpt = Path(checkpoint_dir)
    ckpt_cfg = load_config(ckpt)
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(model_dir(ckpt)))
    _load_model_state(model_chunks, loaded)
    return ckpt_cfg
