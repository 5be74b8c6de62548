"""Launch planning and validation: what a run needs, whether it fits, and how fast it will go.

Public API (imported lazily: `import megatron_longgen.launch` loads neither torch nor Megatron-Core):
- `validate_launch(cfg, *, world_size, gpu=None, gpus_per_node=8, check_files=True, policy=None)` ->
  `LaunchReport` (`.lines`, `.warnings`, `.format()`), or `LaunchError` listing every problem
  (`validate.py`); `LaunchPolicy` holds the judgement-call limits. `validate_launch_from_env(cfg)` is the
  trainer's start-up call: job size from WORLD_SIZE / SLURM_NTASKS, GPU from the CUDA device, policy from
  LONGGEN_* variables.
- `plan(cfg, *, world_size, gpu, ...)` -> candidate layouts ranked by predicted tokens/s/GPU, each with its
  memory (`memory.py`) and step time (`timing.py`) (`plan.py`).
- `resolve_inputs` / `missing_inputs`: a production recipe's data blend, tokenizer and initial checkpoint
  from flags or `LONGGEN_*` variables (`inputs.py`).
- `GPUS`, `get_gpu`, `detect_gpu`: the GPU table with its sources (`gpus.py`).
"""

from __future__ import annotations

_LAZY = {
    "validate_launch": "validate",
    "validate_launch_from_env": "validate",
    "LaunchError": "validate",
    "LaunchPolicy": "validate",
    "LaunchReport": "validate",
    "plan": "plan",
    "evaluate_layout": "plan",
    "resolve_inputs": "inputs",
    "missing_inputs": "inputs",
    "GPUS": "gpus",
    "get_gpu": "gpus",
    "detect_gpu": "gpus",
    "Layout": "layout",
}

__all__ = [
    "GPUS",
    "LaunchError",
    "LaunchPolicy",
    "LaunchReport",
    "Layout",
    "detect_gpu",
    "evaluate_layout",
    "get_gpu",
    "missing_inputs",
    "plan",
    "resolve_inputs",
    "validate_launch",
    "validate_launch_from_env",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"megatron_longgen.launch.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'megatron_longgen.launch' has no attribute {name!r}")
