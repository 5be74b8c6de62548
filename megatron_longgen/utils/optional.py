"""Probes for optional heavy dependencies, in one place.

Nothing here imports the packages; `importlib.util.find_spec` only looks them up. Code that uses one
imports it inside the function that needs it, after `require(...)` has produced a clear install hint.
"""

from __future__ import annotations

import functools
import importlib.util

_EXTRAS = {
    "transformer_engine": "te",
    "wandb": "wandb",
    "transformers": "hf",
    "safetensors": "hf",
}


@functools.cache
def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def has_te() -> bool:
    return _has("transformer_engine")


def has_apex() -> bool:
    # The PyPI package called `apex` is an unrelated web toolkit; NVIDIA apex has `apex.normalization`.
    return _has("apex") and _has("apex.normalization")


def has_wandb() -> bool:
    return _has("wandb")


def has_transformers() -> bool:
    return _has("transformers") and _has("safetensors")


def has_triton() -> bool:
    return _has("triton")


def has_cudnn_bsa() -> bool:
    """cuDNN frontend's block-sparse attention (the `cudnn` package with CuTe DSL: `cutlass`, `cuda.bindings`)."""
    return _has("cudnn.block_sparse_attention") and _has("cutlass") and _has("cuda.bindings")


def require(module: str, *, feature: str) -> None:
    """Raise ImportError naming the pip extra that provides `module`, unless it is importable."""
    if not _has(module):
        extra = _EXTRAS.get(module)
        hint = f"pip install 'megatron_longgen[{extra}]'" if extra else f"pip install {module}"
        raise ImportError(f"{feature} needs the optional package {module!r}: {hint}")
