"""The dense oracle against torch's scaled_dot_product_attention (outputs, LSE, gradients, GQA)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_longgen.attention.masks import SinkWindowPattern
from megatron_longgen.attention.reference import expand_kv_heads, reference_attention


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_causal_matches_sdpa(num_heads, num_kv_heads):
    torch.manual_seed(0)
    B, S, H = 2, 19, 8
    q = torch.randn(B, num_heads, S, H, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, num_kv_heads, S, H, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, num_kv_heads, S, H, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    out, lse = reference_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(
        q, expand_kv_heads(k, num_heads), expand_kv_heads(v, num_heads), is_causal=True
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    scores = q @ expand_kv_heads(k, num_heads).transpose(-1, -2) / math.sqrt(H)
    torch.testing.assert_close(lse, torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1))
    grad = torch.randn_like(out)
    g_ref = torch.autograd.grad((out * grad).sum(), (q, k, v))
    g_sdpa = torch.autograd.grad((expected * grad).sum(), (q, k, v))
    for a, b in zip(g_ref, g_sdpa):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_arbitrary_mask_matches_sdpa_with_bool_mask():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 4, dtype=torch.float64) for _ in range(3))
    mask = SinkWindowPattern(block_size=4, num_sink_blocks=1, num_window_blocks=2).dense_mask(40)
    out, _ = reference_attention(q, k, v, mask, softmax_scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_fully_masked_row_gives_zero_and_minus_inf():
    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])
    out, lse = reference_attention(q, k, v, mask)
    assert torch.all(out[0, 0, 0] == 0) and lse[0, 0, 0] == float("-inf")
    assert torch.isfinite(out).all()
