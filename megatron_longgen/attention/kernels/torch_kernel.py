"""The portable sparse kernel: `block_sparse_attention_torch` driven by the pattern's block table."""

from __future__ import annotations

from megatron_longgen.attention.kernels.base import SparseAttentionKernel, register_kernel
from megatron_longgen.attention.kernels.torch_block import block_sparse_attention_torch
from megatron_longgen.attention.masks import SparsePattern, kv_block_table, num_blocks


class TorchBlockSparseKernel(SparseAttentionKernel):
    """Pure PyTorch, any device and dtype (fp32 arithmetic); memory O(S * kept keys per chunk)."""

    name = "torch"

    @classmethod
    def unavailable_reason(cls, *, device, dtype, pattern=None, head_dim=None) -> str | None:
        return None

    def __call__(self, q_BNSH, k_BGSH, v_BGSH, *, pattern: SparsePattern, softmax_scale=None):
        nb = num_blocks(q_BNSH.shape[2], pattern.block_size)
        table = kv_block_table(pattern, nb, device=q_BNSH.device)
        return block_sparse_attention_torch(
            q_BNSH, k_BGSH, v_BGSH, kv_table=table, block_size=pattern.block_size, softmax_scale=softmax_scale
        )


register_kernel(TorchBlockSparseKernel)
