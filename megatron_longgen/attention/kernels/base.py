"""The interface every sparse-attention kernel implements, and the one-time backend choice.

Legend: B = batch, N = query heads, G = KV heads, S = sequence, H = head dim.

A kernel takes a full (unsharded) causal sequence and a `SparsePattern` and returns `(out, lse)`:
out_BNSH in the input dtype and lse_BNS in fp32 (context parallelism merges partial results with it).
Each kernel says whether it can run on a device/dtype (`unavailable_reason`), and `select_sparse_kernel`
picks one once: `auto` walks `AUTO_ORDER` and takes the first available kernel; an explicitly requested
kernel that cannot run falls back to `torch` with a warning, never silently.
"""

from __future__ import annotations

import abc
import logging
import warnings
from typing import ClassVar

import torch

from megatron_longgen.attention.masks import SparsePattern

logger = logging.getLogger(__name__)


class SparseAttentionKernel(abc.ABC):
    """A block-sparse causal attention implementation."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls, *, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when the kernel runs on `device` with `dtype`, else a one-line reason."""

    @classmethod
    def is_available(cls, *, device: torch.device, dtype: torch.dtype) -> bool:
        return cls.unavailable_reason(device=device, dtype=dtype) is None

    @classmethod
    def assert_supported(cls, *, device: torch.device, dtype: torch.dtype) -> None:
        reason = cls.unavailable_reason(device=device, dtype=dtype)
        if reason is not None:
            raise RuntimeError(f"sparse attention backend {cls.name!r} cannot run here: {reason}")

    @abc.abstractmethod
    def __call__(
        self,
        q_BNSH: torch.Tensor,
        k_BGSH: torch.Tensor,
        v_BGSH: torch.Tensor,
        *,
        pattern: SparsePattern,
        softmax_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention restricted to `pattern`; returns (out_BNSH, lse_BNS)."""


_REGISTRY: dict[str, type[SparseAttentionKernel]] = {}
# Preference order for `auto` (fastest first); kernels register themselves on import.
AUTO_ORDER: list[str] = []
_LOGGED: set[tuple] = set()


def register_kernel(cls: type[SparseAttentionKernel], *, auto_rank: int | None = None) -> type:
    """Add a kernel class to the registry; `auto_rank` (0 = most preferred) puts it in AUTO_ORDER."""
    _REGISTRY[cls.name] = cls
    if auto_rank is not None and cls.name not in AUTO_ORDER:
        AUTO_ORDER.insert(min(auto_rank, len(AUTO_ORDER)), cls.name)
    return cls


def available_kernels() -> dict[str, type[SparseAttentionKernel]]:
    from megatron_longgen.attention import kernels  # noqa: F401  (registers the built-in kernels)

    return dict(_REGISTRY)


def select_sparse_kernel(name: str, *, device: torch.device, dtype: torch.dtype) -> SparseAttentionKernel:
    """Instantiate the kernel called `name` (or the best one for `auto`), logging the choice once."""
    registry = available_kernels()
    device = torch.device(device)
    if name == "auto":
        for candidate in AUTO_ORDER:
            if registry[candidate].is_available(device=device, dtype=dtype):
                chosen = candidate
                break
        else:
            chosen = "torch"
            if device.type == "cuda":
                warnings.warn(
                    f"no fast sparse attention backend runs on {device} with {dtype} "
                    f"(tried {AUTO_ORDER}); falling back to the slow 'torch' kernel",
                    stacklevel=2,
                )
    elif name not in registry:
        raise ValueError(f"unknown sparse attention backend {name!r}; choose from {sorted(registry)}")
    else:
        reason = registry[name].unavailable_reason(device=device, dtype=dtype)
        chosen = name
        if reason is not None:
            warnings.warn(
                f"sparse attention backend {name!r} is unavailable ({reason}); falling back to 'torch'",
                stacklevel=2,
            )
            chosen = "torch"
    key = (name, chosen, device.type, dtype)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("sparse attention backend: %s (requested %s, %s, %s)", chosen, name, device.type, dtype)
    return registry[chosen]()
