"""GPU checks of every fast sparse-attention backend against the dense oracle (fp32 upcast).

Legend: B = batch, N = query heads, G = KV heads, S = sequence, H = head dim.

Criterion (STYLE rule 5): err(fast bf16 vs fp32 oracle) <= 2 x err(naive bf16 oracle vs fp32 oracle) for
the output and the LSE, 3 x for the gradients (max abs error; failures print max and mean). The oracle
builds [B, N, S, S] scores, so lengths stay at a few thousand tokens; 4160 = 65 blocks puts the default
patterns past their window and onto a second stride block.
"""

import pytest
import torch

from megatron_longgen.attention.kernels import available_kernels
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern
from megatron_longgen.attention.reference import reference_attention
from tests.attention.independent_masks import independent_token_mask

pytestmark = pytest.mark.gpu

# Each shape is a new compiled FlexAttention graph; past the default limit of 8, torch.compile would fall
# back to eager (S^2) FlexAttention and the compiled kernel would go untested.
torch._dynamo.config.recompile_limit = 64

PATTERNS = {
    "sink_window": SinkWindowPattern(),
    "block_strided": BlockStridedPattern(),
    "sink_window_w4": SinkWindowPattern(num_window_blocks=4),
    "block_strided_st4_l2": BlockStridedPattern(stride_blocks=4, num_local_blocks=2),
}
SHAPES = [  # (N, G, H)
    (8, 8, 128),
    (8, 2, 64),
]


def _fast_backends():
    dev = torch.device("cuda")
    reg = available_kernels()
    return [n for n in ("triton", "flex") if reg[n].is_available(device=dev, dtype=torch.bfloat16)]


def _cudnn_backends():
    if not torch.cuda.is_available():
        return []
    reg = available_kernels()
    dev = torch.device("cuda")
    return [
        n for n in ("cudnn_bsa", "cudnn_bsa_fwd") if reg[n].is_available(device=dev, dtype=torch.bfloat16)
    ]


def _run(fn, q, k, v, d_out, d_lse):
    """Outputs and gradients of fn; d_lse=None leaves the LSE out of the loss (no LSE gradient)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.float() * d_out).sum()
    if d_lse is not None:
        loss = loss + (lse * d_lse).sum()
    loss.backward()
    return out.float(), lse.float(), q.grad.float(), k.grad.float(), v.grad.float()


def _check(name, fast, ref, naive, factor):
    err = (fast - ref).abs()
    base = (naive - ref).abs().max().item()
    assert err.max().item() <= factor * base + 1e-6, (
        f"{name}: max err {err.max().item():.3e} (mean {err.mean().item():.3e}) > {factor} x naive bf16 err {base:.3e}"
    )


@pytest.mark.parametrize(
    "backend", (_fast_backends() + _cudnn_backends()) if torch.cuda.is_available() else ["none"]
)
@pytest.mark.parametrize("pattern_name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}G{s[1]}H{s[2]}")
@pytest.mark.parametrize("seq_len", [577, 2048, 4160])
def test_backend_matches_oracle(backend, pattern_name, shape, seq_len):
    _compare_with_oracle(backend, PATTERNS[pattern_name], shape, seq_len, lse_gradient=True)


def _compare_with_oracle(backend, pattern, shape, seq_len, *, lse_gradient):
    N, G, H = shape
    torch.manual_seed(seq_len + N + H)
    dev = torch.device("cuda")
    q = torch.randn(1, N, seq_len, H, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, G, seq_len, H, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, G, seq_len, H, device=dev, dtype=torch.bfloat16)
    d_out = torch.randn(1, N, seq_len, H, device=dev)
    d_lse = torch.randn(1, N, seq_len, device=dev) if lse_gradient else None
    mask = independent_token_mask(pattern, seq_len, device=dev)
    kernel = available_kernels()[backend]()
    fast = _run(lambda q, k, v: kernel(q, k, v, pattern=pattern), q, k, v, d_out, d_lse)
    ref = _run(
        lambda q, k, v: reference_attention(q.float(), k.float(), v.float(), mask), q, k, v, d_out, d_lse
    )
    naive = _run(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v, d_out, d_lse)
    assert fast[1].dtype == torch.float32
    for i, what in enumerate(["out", "lse", "dq", "dk", "dv"]):
        _check(f"{backend} {pattern} S={seq_len} {what}", fast[i], ref[i], naive[i], 2 if i < 2 else 3)


@pytest.mark.parametrize(
    "pattern",
    [SinkWindowPattern(), SinkWindowPattern(block_size=16, num_window_blocks=4),
     BlockStridedPattern(block_size=16, stride_blocks=4, num_local_blocks=2)],
    ids=["paper_b64", "debug_tiny_b16_sink_window", "debug_tiny_b16_block_strided"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_auto_runs_what_it_picks_on_gpu(pattern, dtype):
    """`auto` takes the first backend that accepts (device, dtype, pattern, head dim), and that backend
    runs the pattern and matches the oracle (debug_tiny's 16-token blocks crashed the Flex path before)."""
    from megatron_longgen.attention.backends import CANDIDATES, resolve_backend

    dev = torch.device("cuda")
    resolved = resolve_backend(kind="sparse", device=dev, dtype=dtype, pattern=pattern, head_dim=64)
    reg = available_kernels()
    first = next(
        n
        for n in CANDIDATES[("sparse", "local")]
        if reg[n].unavailable_reason(device=dev, dtype=dtype, pattern=pattern, head_dim=64) is None
    )
    assert resolved.name == first != "torch"
    torch.manual_seed(0)
    S = 1000
    q, k, v = (torch.randn(1, 4, S, 64, device=dev, dtype=dtype) for _ in range(3))
    mask = independent_token_mask(pattern, S, device=dev)
    out, lse = reg[resolved.name]()(q, k, v, pattern=pattern)
    ref, ref_lse = reference_attention(q.float(), k.float(), v.float(), mask)
    assert lse.dtype == torch.float32
    if dtype == torch.float32:  # fp32 end to end: rounding only (TF32 matmuls would show as ~1e-3)
        for what, a, b in (("out", out, ref), ("lse", lse, ref_lse)):
            err = (a - b).abs().max().item()
            assert err <= 1e-4, f"auto={resolved.name} fp32 {what}: max err {err:.3e}"
    else:
        naive, naive_lse = reference_attention(q, k, v, mask)
        _check(f"auto={resolved.name} out", out.float(), ref, naive.float(), 2)
        _check(f"auto={resolved.name} lse", lse, ref_lse, naive_lse.float(), 2)


@pytest.mark.skipif(not _cudnn_backends(), reason="cuDNN frontend block-sparse attention is not installed")
@pytest.mark.parametrize("backend", _cudnn_backends() or ["none"])
@pytest.mark.parametrize("pattern_name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", [(8, 8, 128), (8, 2, 128)], ids=lambda s: f"N{s[0]}G{s[1]}H{s[2]}")
@pytest.mark.parametrize("seq_len", [2048, 4096])
def test_cudnn_bsa_without_lse_gradient(backend, pattern_name, shape, seq_len):
    """The model path: no LSE gradient, so cudnn_bsa runs cuDNN's backward on the full tiles (MHA) and
    the Triton backward on the remainder, both from the final out / lse."""
    _compare_with_oracle(backend, PATTERNS[pattern_name], shape, seq_len, lse_gradient=False)


@pytest.mark.skipif(not _cudnn_backends(), reason="cuDNN frontend block-sparse attention is not installed")
def test_cudnn_bsa_unsupported_shape_warns_and_runs_triton():
    kernel = available_kernels()["cudnn_bsa"]()
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, 2, 577, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    with pytest.warns(UserWarning, match="head dim 64"):
        out, lse = kernel(q, k, v, pattern=SinkWindowPattern())
    ref, ref_lse = available_kernels()["triton"]()(q, k, v, pattern=SinkWindowPattern())
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize(
    "backend", (_fast_backends() + _cudnn_backends()) if torch.cuda.is_available() else ["none"]
)
def test_megatron_layout_views_match_contiguous_inputs(backend):
    """Core attention hands the kernels [s, b, n, h] activations permuted to [b, n, s, h] (strided views,
    B = 2 here): outputs and gradients must equal those of contiguous copies."""
    dev = torch.device("cuda")
    S, B, N, G, H = 2048, 2, 4, 4, 128
    torch.manual_seed(7)
    q_sbnh = torch.randn(S, B, N, H, device=dev, dtype=torch.bfloat16)
    k_sbnh = torch.randn(S, B, G, H, device=dev, dtype=torch.bfloat16)
    v_sbnh = torch.randn(S, B, G, H, device=dev, dtype=torch.bfloat16)
    d_out = torch.randn(B, N, S, H, device=dev)
    kernel = available_kernels()[backend]()
    pattern = SinkWindowPattern(num_window_blocks=8)
    views = [t.permute(1, 2, 0, 3) for t in (q_sbnh, k_sbnh, v_sbnh)]
    got = _run(lambda q, k, v: kernel(q, k, v, pattern=pattern), *views, d_out, None)
    want = _run(
        lambda q, k, v: kernel(q, k, v, pattern=pattern), *(t.contiguous() for t in views), d_out, None
    )
    for what, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        # same kernel, same tiles; cuDNN accumulates dQ with fp32 atomics, so allow a few bf16 ulps
        torch.testing.assert_close(
            a, b, rtol=2e-2, atol=2e-2, msg=lambda m, what=what: f"{backend} {what}: {m}"
        )
