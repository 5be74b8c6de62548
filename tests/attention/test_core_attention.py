"""LongGenCoreAttention (the Megatron core_attention of every LongGen layer) on one process (CP = 1).

Checks, for both sparse variants and full layers, MHA and GQA, lengths on and off the block grid:
- outputs and Q/K/V gradients match `reference_attention` on a mask written independently of the
  patterns' rule (tests/attention/independent_masks.py);
- keys a sparse pattern drops are really ignored: perturbing them leaves the outputs bit-identical and
  their K/V gradients exactly zero;
- Megatron's constructor contract (scale default, checks) and the same answer to the same bad input in
  every form (the CP forms run the same checks: tests/context_parallel/test_model_cp.py).
"""

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longgen.attention.core_attention import LongGenCoreAttention, attention_backend_summary
from megatron_longgen.attention.masks import pattern_from_config
from megatron_longgen.attention.reference import reference_attention
from megatron_longgen.config import SparseAttentionConfig
from megatron_longgen.patches.cpu import apply_cpu_patches
from tests.attention.independent_masks import causal_token_mask, independent_token_mask

apply_cpu_patches()

SPARSE = [
    SparseAttentionConfig(
        variant="sink_window", block_size=4, num_sink_blocks=1, num_window_blocks=2, backend="torch"
    ),
    SparseAttentionConfig(
        variant="block_strided", block_size=4, stride_blocks=3, num_local_blocks=1, backend="torch"
    ),
]
LAYERS = [("sparse", SPARSE[0]), ("sparse", SPARSE[1]), ("full", None)]


def _tcfg(num_heads, num_groups, head_dim=8, **kw):
    return TransformerConfig(
        num_layers=1,
        hidden_size=num_heads * head_dim,
        num_attention_heads=num_heads,
        num_query_groups=num_groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        **kw,
    )


def _module(kind, sparse, cfg, **kw):
    # Megatron's SelfAttention passes everything by keyword.
    return LongGenCoreAttention(
        config=cfg,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        kind=kind,
        sparse=sparse,
        **kw,
    )


def _qkv(S, num_heads, num_groups, H=8, B=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, num_heads, H, generator=g, dtype=dtype)
    k = torch.randn(S, B, num_groups, H, generator=g, dtype=dtype)
    v = torch.randn(S, B, num_groups, H, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _oracle(q, k, v, mask, scale=None):
    out, _ = reference_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), mask, softmax_scale=scale
    )
    S, B, N, H = q.shape
    return out.permute(2, 0, 1, 3).reshape(S, B, N * H)


def _mask(kind, sparse, S):
    return causal_token_mask(S) if kind == "full" else independent_token_mask(pattern_from_config(sparse), S)


@pytest.mark.parametrize("kind, sparse", LAYERS, ids=["sink_window", "block_strided", "full"])
@pytest.mark.parametrize("num_heads, num_groups", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("seq_len", [32, 30])
def test_matches_oracle_outputs_and_gradients(kind, sparse, num_heads, num_groups, seq_len):
    module = _module(kind, sparse, _tcfg(num_heads, num_groups))
    assert module.form == "local" and module.resolved.name == ("torch" if kind == "sparse" else "sdpa")
    q, k, v = _qkv(seq_len, num_heads, num_groups)
    out = module(q, k, v, None)
    expected = _oracle(q, k, v, _mask(kind, sparse, seq_len))
    assert out.shape == (seq_len, 2, num_heads * 8) and out.dtype == torch.float64
    # The sparse kernel computes in fp32; the oracle here in fp64.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    want = torch.autograd.grad((expected * grad).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("sparse", SPARSE, ids=lambda s: s.variant)
@pytest.mark.parametrize("num_heads, num_groups", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_masked_out_keys_are_ignored(sparse, num_heads, num_groups):
    S = 40
    module = _module("sparse", sparse, _tcfg(num_heads, num_groups))
    mask = independent_token_mask(pattern_from_config(sparse), S)
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
    # A window covering the whole sequence makes the sparse layer dense causal: same as a full layer.
    sparse = SparseAttentionConfig(block_size=8, num_window_blocks=100, backend="torch")
    cfg = _tcfg(4, 2)
    q, k, v = _qkv(48, 4, 2, dtype=torch.float32)
    a = _module("sparse", sparse, cfg)(q, k, v, None)
    b = _module("full", None, cfg)(q, k, v, None)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, sparse", LAYERS, ids=["sink_window", "block_strided", "full"])
def test_softmax_scale_default_and_override(kind, sparse):
    q, k, v = _qkv(24, 4, 2, dtype=torch.float64)
    default = _module(kind, sparse, _tcfg(4, 2))
    assert default.softmax_scale == pytest.approx(8**-0.5)  # 1 / sqrt(kv_channels)
    scaled = LongGenCoreAttention(
        _tcfg(4, 2), 1, AttnMaskType.causal, "self", None, 0.05, kind=kind, sparse=sparse
    )
    assert scaled.softmax_scale == 0.05
    torch.testing.assert_close(
        scaled(q, k, v, None), _oracle(q, k, v, _mask(kind, sparse, 24), scale=0.05), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind, sparse", LAYERS, ids=["sink_window", "block_strided", "full"])
def test_same_bad_input_same_error_in_every_layer_kind(kind, sparse):
    with pytest.raises(ValueError, match="attn_mask_type=causal only"):
        LongGenCoreAttention(_tcfg(4, 4), 1, AttnMaskType.no_mask, "self", kind=kind, sparse=sparse)
    with pytest.raises(ValueError, match="has no dropout; got attention_dropout 0.1"):
        LongGenCoreAttention(_tcfg(4, 4), 1, AttnMaskType.causal, "self", 0.1, kind=kind, sparse=sparse)
    module = _module(kind, sparse, _tcfg(4, 4))
    q, k, v = _qkv(8, 4, 4)
    with pytest.raises(
        ValueError, match=r"causal by construction: pass attention_mask=None \(got a mask of shape"
    ):
        module(q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed_seq_params nor attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="attn_mask_type=causal only"):
        module(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    module(q, k, v, None, attn_mask_type=AttnMaskType.causal)  # Megatron's recompute path passes it


def test_constructor_checks():
    with pytest.raises(ValueError, match="needs sparse="):
        _module("sparse", None, _tcfg(4, 4))
    with pytest.raises(ValueError, match="layer kind must be one of"):
        _module("dense", None, _tcfg(4, 4))
    with pytest.raises(ValueError, match="needs pg_collection.cp"):
        _module("full", None, _tcfg(4, 4, context_parallel_size=2))
    # A named backend that cannot run is refused when the model is built, not at the first step.
    with pytest.raises(ValueError, match="'triton' .*cannot run on cpu"):
        _module("sparse", SparseAttentionConfig(block_size=4, backend="triton"), _tcfg(4, 4))


def test_activations_on_another_dtype_are_resolved_again():
    module = _module("sparse", SPARSE[0], _tcfg(4, 2))
    assert module.resolved.dtype == "float32"
    q, k, v = _qkv(16, 4, 2, dtype=torch.bfloat16)
    module(q, k, v, None)
    assert module.resolved.dtype == "bfloat16" and module.resolved.name == "torch"


def test_backend_summary():
    layers = torch.nn.ModuleList([_module("sparse", SPARSE[0], _tcfg(4, 2)) for _ in range(2)])
    layers.append(_module("full", None, _tcfg(4, 2)))
    summary = attention_backend_summary([layers])
    assert summary == (
        "attention: 1 x full layers -> sdpa (local; requested auto; cpu/float32), "
        "2 x sparse layers -> torch (local; requested torch; cpu/float32)"
    )
