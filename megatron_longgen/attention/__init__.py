"""Attention: sparse patterns (`masks`), the dense oracle (`reference`), whole-sequence kernels (`kernels/`),
the one backend resolver (`backends`) and the Megatron `core_attention` module of every LongGen layer
(`core_attention`). Import submodules directly; this package imports nothing heavy."""
