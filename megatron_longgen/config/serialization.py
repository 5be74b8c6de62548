"""The plain-dict (JSON) form of a `LongGenConfig`, as stored in run dirs and checkpoints."""

from __future__ import annotations

import dataclasses

from megatron_longgen.config.schema import (
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LongGenConfig,
    ModelConfig,
    ParallelConfig,
    SparseAttentionConfig,
    TrainingConfig,
)


def config_to_dict(cfg: LongGenConfig) -> dict:
    """Plain nested dict (JSON-serialisable) of a config, e.g. for checkpoints and W&B."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> LongGenConfig:
    """Inverse of `config_to_dict`. Unknown keys raise ValueError (a newer/older checkpoint format)."""
    sections = {
        "model": ModelConfig,
        "sparse": SparseAttentionConfig,
        "parallel": ParallelConfig,
        "train": TrainingConfig,
        "data": DataConfig,
        "logging": LoggingConfig,
        "eval": EvalConfig,
    }
    kwargs = {}
    for key, value in data.items():
        if key == "name":
            kwargs["name"] = value
        elif key in sections:
            cls = sections[key]
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise ValueError(f"unknown fields in config section {key!r}: {sorted(unknown)}")
            kwargs[key] = cls(**value)
        else:
            raise ValueError(f"unknown config section {key!r}")
    return LongGenConfig(**kwargs)
