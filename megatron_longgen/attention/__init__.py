"""Attention: sparse patterns (masks), the dense oracle (reference), kernels, and Megatron core-attention
modules. Import submodules directly; this package imports nothing heavy."""
