"""SparseCoreAttention (the Megatron core_attention of S layers) against the dense oracle.

Checks, for both variants, MHA and GQA, lengths on and off the block grid:
- outputs and Q/K/V gradients match `reference_attention` with the pattern's dense mask;
- keys the pattern drops are really ignored: perturbing them leaves the outputs bit-identical and their
  K/V gradients exactly zero.
"""

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.attention.core_attention import FullCoreAttention, SparseCoreAttention
from megatron_longgen.attention.masks import pattern_from_config
from megatron_longgen.attention.reference import reference_attention
from megatron_longgen.config import SparseAttentionConfig

SPARSE = [
    SparseAttentionConfig(variant="sink_window", block_size=4, num_sink_blocks=1, num_window_blocks=2, backend="torch"),
    SparseAttentionConfig(variant="block_strided", block_size=4, stride_blocks=3, num_local_blocks=1, backend="torch"),
]


def _tcfg(num_heads, num_groups, head_dim=8):
    return TransformerConfig(num_layers=1, hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                             num_query_groups=num_groups, kv_channels=head_dim, attention_dropout=0.0,
                             use_cpu_initialization=True)


def _qkv(S, num_heads, num_groups, H=8, B=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, num_heads, H, generator=g, dtype=dtype)
    k = torch.randn(S, B, num_groups, H, generator=g, dtype=dtype)
    v = torch.randn(S, B, num_groups, H, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _oracle(q, k, v, mask):
    out, _ = reference_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), mask)
    S, B, N, H = q.shape
    return out.permute(2, 0, 1, 3).reshape(S, B, N * H)


@pytest.mark.parametrize("sparse", SPARSE, ids=lambda s: s.variant)
@pytest.mark.parametrize("num_heads, num_groups", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("seq_len", [32, 30])
def test_matches_oracle_outputs_and_gradients(sparse, num_heads, num_groups, seq_len):
    module = SparseCoreAttention(_tcfg(num_heads, num_groups), 1, AttnMaskType.causal, "self", sparse=sparse)
    q, k, v = _qkv(seq_len, num_heads, num_groups)
    out = module(q, k, v, None)
    expected = _oracle(q, k, v, pattern_from_config(sparse).dense_mask(seq_len))
    # The kernel computes in fp32; the oracle here in fp64.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    want = torch.autograd.grad((expected * grad).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("sparse", SPARSE, ids=lambda s: s.variant)
@pytest.mark.parametrize("num_heads, num_groups", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_masked_out_keys_are_ignored(sparse, num_heads, num_groups):
    S = 40
    module = SparseCoreAttention(_tcfg(num_heads, num_groups), 1, AttnMaskType.causal, "self", sparse=sparse)
    mask = pattern_from_config(sparse).dense_mask(S)
    # Keys no query of the LAST query block sees (that block's rows of the mask are all False for them).
    last_block = slice(S - sparse.block_size, S)
    hidden = ~mask[last_block].any(dim=0)
    assert 0 < int(hidden.sum()) < S - sparse.block_size  # the pattern really drops keys here

    q, k, v = _qkv(S, num_heads, num_groups, dtype=torch.float32)
    out = module(q, k, v, None)
    grad = torch.zeros_like(out)
    grad[last_block] = torch.randn_like(out[last_block])  # loss depends on the last block's outputs only
    _, dk, dv = torch.autograd.grad((out * grad).sum(), (q, k, v))
    assert torch.all(dk[hidden] == 0) and torch.all(dv[hidden] == 0)
    assert dk[~hidden].abs().sum() > 0

    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[hidden] += 100 * torch.randn_like(k2[hidden])
    v2[hidden] += 100 * torch.randn_like(v2[hidden])
    out2 = module(q.detach(), k2, v2, None)
    assert torch.equal(out2[last_block], out.detach()[last_block])


def test_wide_window_equals_full_attention():
    # A window covering the whole sequence makes the sparse layer dense causal: same as FullCoreAttention.
    sparse = SparseAttentionConfig(block_size=8, num_window_blocks=100, backend="torch")
    cfg = _tcfg(4, 2)
    q, k, v = _qkv(48, 4, 2, dtype=torch.float32)
    a = SparseCoreAttention(cfg, 1, AttnMaskType.causal, "self", sparse=sparse)(q, k, v, None)
    b = FullCoreAttention(cfg, 1, AttnMaskType.causal, "self")(q, k, v, None)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rejects_unsupported_inputs():
    with pytest.raises(ValueError, match="attn_mask_type=causal only"):
        SparseCoreAttention(_tcfg(4, 4), 1, AttnMaskType.no_mask, "self", sparse=SPARSE[0])
    module = SparseCoreAttention(_tcfg(4, 4), 1, AttnMaskType.causal, "self", sparse=SPARSE[0])
    q, k, v = _qkv(8, 4, 4)
    with pytest.raises(ValueError, match="packed_seq_params nor attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1))
