"""One optimizer step that refuses non-finite gradients, using the grad norm the step computes anyway.

bf16 training has no loss scaler, so Megatron-Core's `optimizer.step()` applies NaN/Inf gradients (its
clipping compares `max_norm / norm < 1`, which is False for NaN). Instead of a separate pass over every
gradient buffer, this runs the step's own stages — `prepare_grads()` (model grads -> main grads; fp16's
loss-scaler overflow check), `get_grad_norm()` (one fused norm, already reduced over the model-parallel and,
for the distributed optimizer, data-parallel groups, so every rank sees the same value), clipping by that
norm, `step_with_ready_grads()` — and stops after the norm when it is not finite.

These are the public stages of `MegatronOptimizer.step()` in Megatron-Core 0.16.1 and 0.19.x
(`MixedPrecisionOptimizer`, `FP32Optimizer`, `ChainedOptimizer`, `DistributedOptimizer`); the sequence is
the same as theirs, so a finite step is bit-identical to `optimizer.step()` (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepOutcome:
    updated: bool
    """The weights changed."""
    grad_norm: float
    """Global gradient norm before clipping (NaN when fp16's loss scaler found an overflow)."""
    nonfinite: bool
    """The gradient norm was NaN/Inf and the update was withheld (the caller's NaN policy decides)."""


@torch.no_grad()
def step_unless_nonfinite(optimizer) -> StepOutcome:
    """Clip and apply the gradients unless their global norm is not finite (then leave the weights alone)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # fp16 loss-scaler overflow: Megatron's own skip, scale already lowered
        return StepOutcome(updated=False, grad_norm=float("nan"), nonfinite=False)
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return StepOutcome(updated=False, grad_norm=grad_norm, nonfinite=True)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "is_stub_optimizer", False) or inner.config.clip_grad <= 0.0:
            continue
        params = inner.get_parameters()
        if params:
            decoupled = bool(getattr(inner.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False))
            clip_grad_by_total_norm_fp32(params, inner.config.clip_grad, grad_norm, decoupled)
    updated = bool(optimizer.step_with_ready_grads())
    return StepOutcome(updated=updated, grad_norm=grad_norm, nonfinite=False)
