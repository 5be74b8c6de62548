"""Whole-sequence sparse attention kernels behind one interface (`base.SparseAttentionKernel`).

Importing this package registers the built-in kernels (`torch`, `flex`, `triton`, `cudnn_bsa`,
`cudnn_bsa_fwd`); GPU-only kernels register too but report themselves unavailable where they cannot run.
Which one a layer uses is decided by `attention/backends.py`.
"""

from megatron_longgen.attention.kernels.base import SparseAttentionKernel, available_kernels, register_kernel
from megatron_longgen.attention.kernels.cudnn_bsa import CudnnBlockSparseForwardKernel, CudnnBlockSparseKernel
from megatron_longgen.attention.kernels.flex import FlexSparseKernel
from megatron_longgen.attention.kernels.torch_block import block_sparse_attention_torch
from megatron_longgen.attention.kernels.torch_kernel import TorchBlockSparseKernel
from megatron_longgen.attention.kernels.triton_block_sparse import TritonBlockSparseKernel

__all__ = [
    "CudnnBlockSparseForwardKernel",
    "CudnnBlockSparseKernel",
    "FlexSparseKernel",
    "SparseAttentionKernel",
    "TorchBlockSparseKernel",
    "TritonBlockSparseKernel",
    "available_kernels",
    "block_sparse_attention_torch",
    "register_kernel",
]
