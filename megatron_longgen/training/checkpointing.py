"""Model checkpoints in Megatron-Core's distributed format (resharded on load).

Layout of a checkpoint folder (shared with the HF converter):
    DIR/longgen_config.json     the run's LongGenConfig (config_to_dict) + "format_version"
    DIR/model/                  dist_checkpointing.save(model.sharded_state_dict(), DIR/model)
The folder is written under a temporary name and renamed when complete, so a crash never leaves a
half-written checkpoint where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_longgen.config import LongGenConfig, config_to_dict

FORMAT_VERSION = 1


def _model_state(model_chunks) -> dict:
    chunks = [getattr(m, "module", m) for m in model_chunks]
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"vp{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(model_chunks, cfg: LongGenConfig, out_dir: str | os.PathLike) -> Path:
    """Write the model (all ranks take part) and config (rank 0) to `out_dir`; returns it."""
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "model").mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_model_state(model_chunks), str(tmp / "model"))
    dist.barrier()
    if rank == 0:
        payload = {"format_version": FORMAT_VERSION, **config_to_dict(cfg)}
        (tmp / "longgen_config.json").write_text(json.dumps(payload, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
    return out
