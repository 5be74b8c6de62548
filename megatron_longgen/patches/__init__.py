"""Narrow, version-checked patches of Megatron-Core (never edits of its files).

- `cpu.py` (+ `cpu_torch.py`): Megatron-Core's CUDA assumptions in a process without CUDA, scoped to the
  Megatron modules and functions that make them; `cpu_patches()` / `apply_cpu_patches()`.
- `distrib_optimizer_step.py`: loading a `fully_reshardable` distributed-optimizer checkpoint into
  torch's Adam; `patch_fully_reshardable_step()` / `fully_reshardable_step()`.

Each patch names the upstream versions it was tested with and raises `UntestedVersionError` on any other,
is applied explicitly by the code that needs it (a context manager, or an entry point's call), wraps the
upstream functions it changes, and can be undone (`_base.py` holds the shared machinery). Importing this
package imports neither Megatron-Core nor any patch.
"""
