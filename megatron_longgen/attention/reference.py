"""The dense oracle every attention path is checked against.

Legend: B = batch, N = query heads, G = key/value heads (GQA groups), S = query length, T = key length,
H = head dim.

`reference_attention` materialises the [B, N, S, T] score matrix from an explicit boolean mask, so it is
for tests and small shapes only. It computes in the dtype of its inputs: call it with fp32 (or fp64)
tensors for the gold result, and with bf16 tensors to measure the error of a naive low-precision run,
which is the yardstick fast paths are held to (STYLE rule 5).
"""

from __future__ import annotations

import math

import torch

from megatron_longgen.compat.torch_cpu import warm_up_cpu_math

warm_up_cpu_math()  # before this module's first exp on CPU (compat/torch_cpu.py)


def expand_kv_heads(x_BGTH: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, G, T, H] -> [B, N, T, H]: KV head g serves query heads g*N/G .. (g+1)*N/G - 1 (Megatron and
    HF order)."""
    groups = x_BGTH.shape[1]
    if num_heads % groups:
        raise ValueError(f"num_heads {num_heads} must be a multiple of kv heads {groups}")
    return x_BGTH.repeat_interleave(num_heads // groups, dim=1)


def reference_attention(
    q_BNSH: torch.Tensor,
    k_BGTH: torch.Tensor,
    v_BGTH: torch.Tensor,
    mask_ST: torch.Tensor | None,
    *,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with an explicit mask.

    Args:
        q_BNSH, k_BGTH, v_BGTH: queries, keys, values; G must divide N.
        mask_ST: boolean [S, T] (or broadcastable to [B, N, S, T]), True = attend. None = no mask.
        softmax_scale: defaults to 1/sqrt(H).

    Returns:
        out_BNSH in the input dtype, and lse_BNS = logsumexp of the scaled, masked scores (fp32, or fp64
        for fp64 inputs).
        A query row with no visible key gets out = 0 and lse = -inf.
    """
    num_heads, head_dim = q_BNSH.shape[1], q_BNSH.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    k = expand_kv_heads(k_BGTH, num_heads)
    v = expand_kv_heads(v_BGTH, num_heads)
    scores = torch.matmul(q_BNSH, k.transpose(-1, -2)) * scale
    if mask_ST is not None:
        scores = scores.masked_fill(~mask_ST, float("-inf"))
    # Softmax in at least fp32 (fp64 stays fp64); probabilities go back to the input dtype for P @ V.
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = torch.nan_to_num(probs, nan=0.0).to(q_BNSH.dtype)
    out = torch.matmul(probs, v)
    return out, lse
