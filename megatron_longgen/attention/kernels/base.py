"""The interface every whole-sequence sparse-attention kernel implements, and the registry of kernels.

Legend: B = batch, N = query heads, G = KV heads, S = sequence, H = head dim.

A kernel takes a full (unsharded) causal sequence and a `SparsePattern` and returns `(out, lse)`:
out_BNSH in the input dtype and lse_BNS in fp32 (context parallelism merges partial results with it).
Each kernel says whether it can run a pattern on a device/dtype at a head dim (`unavailable_reason`; the
pattern and head dim are optional so that device-only questions can be asked too). Which kernel a layer
runs is decided in one place, `attention/backends.py`; this module only knows the kernels by name.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from megatron_longgen.attention.masks import SparsePattern


class SparseAttentionKernel(abc.ABC):
    """A block-sparse causal attention implementation."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(
        cls,
        *,
        device: torch.device,
        dtype: torch.dtype,
        pattern: SparsePattern | None = None,
        head_dim: int | None = None,
    ) -> str | None:
        """None when the kernel runs `pattern` on `device` with `dtype` and `head_dim` (None = any), else a
        one-line reason."""

    @classmethod
    def is_available(
        cls, *, device: torch.device, dtype: torch.dtype, pattern: SparsePattern | None = None
    ) -> bool:
        return cls.unavailable_reason(device=device, dtype=dtype, pattern=pattern) is None

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


def register_kernel(cls: type[SparseAttentionKernel]) -> type:
    """Add a kernel class to the registry under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def available_kernels() -> dict[str, type[SparseAttentionKernel]]:
    """Every registered kernel class by name (whether or not it can run here)."""
    from megatron_longgen.attention import kernels  # noqa: F401  (registers the built-in kernels)

    return dict(_REGISTRY)
