"""What a training checkpoint holds besides the files' layout: the model's sharded state dict (all
virtual-pipeline chunks), the per-rank RNG streams, the optimizer's sharding metadata, and the small
adjustments loading needs (fresh Adam state, the running TP/PP). Shared by `saver.py` and `loading.py`.
"""

from __future__ import annotations

import random

import torch


def _unwrap(model_chunks) -> list:
    return [getattr(m, "module", m) for m in model_chunks]


def model_sharded_state_dict(model_chunks) -> dict:
    """One sharded state dict for all model chunks (virtual pipeline chunks nest under `vpN`; the
    ShardedTensor keys are global, so the files do not depend on the layout)."""
    chunks = _unwrap(model_chunks)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"vp{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def load_model_state(model_chunks, state: dict) -> None:
    chunks = _unwrap(model_chunks)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"vp{i}"])


def rng_state() -> dict:
    import numpy as np
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def optimizer_metadata(fmt: str) -> dict:
    """Megatron-Core's sharding choice for DistributedOptimizer state (other optimizers ignore it). Its
    default in 0.16.1, `fully_sharded_model_space`, fails to save at DP > 1 ("ShardedTensor.flattened_range
    is not supported"), so the format is always named explicitly."""
    return {"distrib_optim_sharding_type": fmt}


def materialize_adam_state(optimizer) -> None:
    """Give a fresh torch Adam zero moments and step 0 before a checkpoint is loaded into it.

    Megatron-Core's DistributedOptimizer builds its load request from `state_dict()`, which (without apex or
    Transformer Engine) reads each parameter's `step` and fails on an optimizer that never stepped. The
    placeholders are overwritten by the loaded state.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def saved_adam_steps(optimizer, loaded: dict) -> list[float | None]:
    """The Adam step count a checkpoint saved for each of `optimizer`'s chained optimizers (None where it
    saved none): `param_groups[*]["step"]` of each DistributedOptimizer's `optimizer` entry, read before
    `load_state_dict` consumes `loaded` (one chained optimizer: `loaded` is its own state dict; several:
    a dict keyed by index)."""
    chained = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if len(chained) == 1:
        parts = [loaded]
    elif isinstance(loaded, dict):
        parts = [v for _, v in sorted(loaded.items())]
    else:
        parts = list(loaded)
    steps: list[float | None] = []
    for part in parts:
        groups = part.get("optimizer", {}).get("param_groups", []) if isinstance(part, dict) else []
        found = {float(g["step"]) for g in groups if isinstance(g, dict) and g.get("step") is not None}
        if len(found) > 1:
            raise ValueError(
                f"the checkpoint's optimizer param groups disagree on the Adam step: {sorted(found)}"
            )
        steps.append(found.pop() if found else None)
    return steps


def restore_adam_steps(optimizer, steps: list[float | None]) -> None:
    """Give every parameter of each DistributedOptimizer's torch Adam its own `step` tensor holding the
    saved count, after `load_state_dict`.

    Without apex or Transformer Engine, Megatron-Core's DistributedOptimizer (0.16.1 and 0.19.2) falls back
    to `torch.optim.Adam`, which keeps a 0-dim `step` tensor per parameter, and mishandles it on load:
    `load_state_dict` gives every parameter *the same* step tensor (so each optimizer step adds the number
    of parameters to it, since Adam increments the per-parameter step in place), and the dp_reshardable
    parameter-state load then copies the pre-load value (0) into it. Either way the bias corrections of the
    steps after a resume differ from an uninterrupted run. TE's FusedAdam keeps the step in the param group
    and has no per-parameter `step`: nothing to do there.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for chained, step in zip(getattr(optimizer, "chained_optimizers", [optimizer]), steps):
        if step is None or not isinstance(chained, DistributedOptimizer):
            continue
        for state in chained.optimizer.state.values():
            old = state.get("step")
            if isinstance(old, torch.Tensor):
                state["step"] = torch.tensor(step, dtype=old.dtype, device=old.device)


def cfg_parallel_sizes() -> tuple[int, int]:
    """(TP, PP) of the running job, from Megatron-Core's parallel state."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
