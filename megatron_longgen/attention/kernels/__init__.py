"""Sparse attention kernels behind one interface (`base.SparseAttentionKernel`).

Importing this package registers the built-in kernels; GPU-only kernels register themselves too but report
themselves unavailable where they cannot run.
"""

from megatron_longgen.attention.kernels.base import (
    SparseAttentionKernel,
    available_kernels,
    register_kernel,
    select_sparse_kernel,
)
from megatron_longgen.attention.kernels.flex import FlexSparseKernel
from megatron_longgen.attention.kernels.torch_block import block_sparse_attention_torch
from megatron_longgen.attention.kernels.torch_kernel import TorchBlockSparseKernel
from megatron_longgen.attention.kernels.triton_block_sparse import TritonBlockSparseKernel
from megatron_longgen.attention.kernels.cudnn_bsa import CudnnBlockSparseForwardKernel, CudnnBlockSparseKernel  # isort: skip

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
    "select_sparse_kernel",
]
