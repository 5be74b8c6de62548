"""LongGen run configuration: typed dataclasses (`schema`), `section.field=value` overrides (`overrides`) and
the JSON form kept in run dirs and checkpoints (`serialization`)."""

from megatron_longgen.config.overrides import apply_overrides
from megatron_longgen.config.schema import (
    DTYPES,
    LONG_CONTEXT_TASKS,
    ROPE_SCALINGS,
    SPARSE_BACKENDS,
    SPARSE_VARIANTS,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LongGenConfig,
    ModelConfig,
    ParallelConfig,
    SparseAttentionConfig,
    SparseVariant,
    TrainingConfig,
)
from megatron_longgen.config.serialization import config_from_dict, config_to_dict

__all__ = [
    "DTYPES",
    "LONG_CONTEXT_TASKS",
    "ROPE_SCALINGS",
    "SPARSE_BACKENDS",
    "SPARSE_VARIANTS",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LongGenConfig",
    "ModelConfig",
    "ParallelConfig",
    "SparseAttentionConfig",
    "SparseVariant",
    "TrainingConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
]
