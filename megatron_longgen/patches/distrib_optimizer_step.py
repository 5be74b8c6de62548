"""Megatron-Core 0.16.1: loading a `fully_reshardable` DistributedOptimizer checkpoint into torch's Adam.

Without apex or Transformer Engine, Megatron falls back to `torch.optim.Adam`, whose per-parameter state
holds a `step` tensor next to `exp_avg` / `exp_avg_sq`. `DistributedOptimizer.load_state_dict` restores that
step from the param groups, then `_set_main_param_and_optimizer_states` copies every key of the live state
from the checkpoint's per-parameter tensors, which carry no `step`, and fails with `KeyError: 'step'`
(`megatron/core/optimizer/distrib_optimizer.py`, 0.16.1). The patch copies the keys the checkpoint has and
leaves the already-restored step alone.
"""

from __future__ import annotations

_MARK = "_longgen_step_patch"


def patch_fully_reshardable_step() -> None:
    """Apply the fix (idempotent)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, _MARK, False):
        return

    def set_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    setattr(set_states, _MARK, True)
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
