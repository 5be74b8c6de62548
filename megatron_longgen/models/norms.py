"""RMSNorm for the non-Transformer-Engine path.

Megatron-Core's `WrappedTorchNorm` refuses `sequence_parallel=True`; this module supports it by tagging its
weight with `sequence_parallel` so Megatron's `finalize_model_grads` all-reduces that weight's gradient over
the TP group (each TP rank sees a different slice of the sequence). Parameter name `weight` keeps
checkpoints interchangeable with `WrappedTorchNorm` and TE's norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = x / rms(x) * weight, computed in fp32 and cast back (Llama's convention)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * self.weight.float()).to(x.dtype)
