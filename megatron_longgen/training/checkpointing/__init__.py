"""Training checkpoints: Megatron-Core distributed checkpoints, saved in the background or not, each
published atomically with a manifest, verified on resume with a fall-back to the newest intact one.

    RUN_DIR/checkpoints/
      latest                  text: the name of the newest published checkpoint ("step_0000100")
      step_0000100/
        longgen_config.json   {"format_version": 1, "config": ...}     (checkpoint.format.save_config)
        model/                dist checkpoint of model.sharded_state_dict()   (global tensors: any TP/PP)
        optim/                dist checkpoint of optimizer.sharded_state_dict(model_sd)
        rng/rank_00000.pt     per-rank RNG states (python, numpy, torch, CUDA, Megatron's tracker)
        trainer_state.json    step, LR-scheduler state, NaN-skip counter, world layout
        manifest.json         every file above with its size and checksum, written last
      .tmp_step_0000200/      a save in progress (ignored by readers; removed by the next save)

The model part is `checkpoint/format.py`'s, shared with the HF converter, so a training checkpoint is also
a converter/inference checkpoint. Data-iterator state is the step number alone: the trainer's sample
order is a pure function of (seed, step).

Modules, one concept each:
- `layout.py`       folder names, published checkpoints, `latest` (no torch)
- `saver.py`        `CheckpointSaver`: background/synchronous saves, publish, rotation, save timings
- `megatron_async.py`  Megatron-Core's async-save requests combined, cleaned up, tied to the trainer
- `save_errors.py`  full disk / unwritable folder -> one `CheckpointSaveError`; the size estimate
- `manifest.py`     manifests, `verify_checkpoint`, `find_resumable_checkpoint`, `select_resume_checkpoint`
- `loading.py`      `load_training_checkpoint` (resume), `load_model_weights` (weights only)
- `state.py`        what is saved: sharded state dicts, RNG streams, optimizer metadata

Public names are importable from this package (lazily: importing it loads neither torch nor Megatron).
"""

from __future__ import annotations

_LAZY = {
    "LATEST_FILE": "layout",
    "MANIFEST_FILE": "layout",
    "OPTIM_SUBDIR": "layout",
    "RNG_SUBDIR": "layout",
    "TRAINER_STATE_FILE": "layout",
    "checkpoint_name": "layout",
    "complete_checkpoints": "layout",
    "latest_checkpoint": "layout",
    "published_checkpoints": "layout",
    "read_trainer_state": "layout",
    "CheckpointSaver": "saver",
    "SaveResult": "saver",
    "async_save_supported": "megatron_async",
    "save_training_checkpoint": "saver",
    "CheckpointSaveError": "save_errors",
    "CorruptCheckpointError": "manifest",
    "NoIntactCheckpointError": "manifest",
    "find_resumable_checkpoint": "manifest",
    "select_resume_checkpoint": "manifest",
    "verify_checkpoint": "manifest",
    "load_model_weights": "loading",
    "load_training_checkpoint": "loading",
    "model_sharded_state_dict": "state",
}

__all__ = [
    "LATEST_FILE",
    "MANIFEST_FILE",
    "OPTIM_SUBDIR",
    "RNG_SUBDIR",
    "TRAINER_STATE_FILE",
    "CheckpointSaveError",
    "CheckpointSaver",
    "CorruptCheckpointError",
    "NoIntactCheckpointError",
    "SaveResult",
    "async_save_supported",
    "checkpoint_name",
    "complete_checkpoints",
    "find_resumable_checkpoint",
    "latest_checkpoint",
    "load_model_weights",
    "load_training_checkpoint",
    "model_sharded_state_dict",
    "published_checkpoints",
    "save_training_checkpoint",
    "select_resume_checkpoint",
    "verify_checkpoint",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"megatron_longgen.training.checkpointing.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'megatron_longgen.training.checkpointing' has no attribute {name!r}")
