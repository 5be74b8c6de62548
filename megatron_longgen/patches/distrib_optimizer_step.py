"""Loading a `fully_reshardable` DistributedOptimizer checkpoint into torch's Adam (Megatron-Core 0.16.1
and 0.19.2; CPU and GPU).

Without apex or Transformer Engine, Megatron falls back to `torch.optim.Adam`, whose per-parameter state
holds a `step` tensor next to `exp_avg` / `exp_avg_sq`. `DistributedOptimizer.load_state_dict` restores that
step from the param groups, then `_set_main_param_and_optimizer_states` copies every (tensor) key of the
live state from the checkpoint's per-parameter tensors, which carry no `step`, and fails with
`KeyError: 'step'` (`megatron/core/optimizer/distrib_optimizer.py`, the same in 0.16.1 and 0.19.2). The
wrapper hides the already-restored step from the upstream method for the call, so it copies the keys the
checkpoint has, and puts the step back.

Entry points: `patch_fully_reshardable_step()` (process-wide, idempotent; the trainer calls it before
loading such a checkpoint), `unpatch_fully_reshardable_step()`, and the scoped `fully_reshardable_step()`.
All raise `UntestedVersionError` on other megatron-core versions.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

from megatron_longgen.patches._base import AttributeSwaps, require_tested_version

TESTED_MCORE = ("0.16.1", "0.19.2")
TARGET = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states"

_lock = threading.RLock()
_swaps: AttributeSwaps | None = None
_users = 0
_process_wide = False


def _without_restored_step(original: Callable) -> Callable:
    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)  # upstream handles these cases itself
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return set_states


def _acquire() -> None:
    global _swaps, _users
    with _lock:
        if _swaps is None:
            require_tested_version(
                patch="the fully_reshardable step patch", package="megatron-core", tested=TESTED_MCORE
            )
            swaps = AttributeSwaps()
            swaps.wrap(TARGET, _without_restored_step)
            _swaps = swaps
        _users += 1


def _release() -> None:
    global _swaps, _users
    with _lock:
        _users -= 1
        if _users == 0 and _swaps is not None:
            _swaps.undo()
            _swaps = None


@contextlib.contextmanager
def fully_reshardable_step() -> Iterator[None]:
    """Apply the fix for the duration of the block."""
    _acquire()
    try:
        yield
    finally:
        _release()


def patch_fully_reshardable_step() -> None:
    """Apply the fix until `unpatch_fully_reshardable_step()` (idempotent)."""
    global _process_wide
    with _lock:
        if not _process_wide:
            _acquire()
            _process_wide = True


def unpatch_fully_reshardable_step() -> None:
    global _process_wide
    with _lock:
        if _process_wide:
            _process_wide = False
            _release()
