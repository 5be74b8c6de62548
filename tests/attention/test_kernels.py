"""CPU tests of the sparse-attention kernels: tile tables, FlexAttention (eager), Triton (interpreter).

Legend: B = batch, N = query heads, G = KV heads, S = sequence, H = head dim, b = pattern block size.

Everything is compared with the one dense oracle (`reference_attention`) on a mask written independently
of the patterns' `block_rule` (tests/attention/independent_masks.py), outputs, LSE and gradients (through
out and lse), in fp32 where both sides compute exactly, so the tolerances are tight. Lengths that are not
multiples of the block or tile sizes are included. test_wrong_rules.py shows that a wrong rule fails them.
FlexAttention's backward is refused on CPU by a device guard; the tests lift it (test-only patch).
The Triton kernels run under `TRITON_INTERPRET=1` in one subprocess (the variable must be set before
Triton builds its kernels), on tiny shapes.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from megatron_longgen.attention.kernels.flex import FlexSparseKernel, pattern_block_mask
from megatron_longgen.attention.kernels.tiles import build_tile_tables, tile_bits
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern
from megatron_longgen.attention.reference import reference_attention
from tests.attention.independent_masks import independent_token_mask
from tests.helpers.triton_interpreter import require_triton_interpreter

SMALL_PATTERNS = [
    SinkWindowPattern(block_size=16, num_sink_blocks=1, num_window_blocks=3),
    SinkWindowPattern(block_size=16, num_sink_blocks=2, num_window_blocks=2),
    BlockStridedPattern(block_size=16, stride_blocks=3, num_local_blocks=1),
    BlockStridedPattern(block_size=16, stride_blocks=4, num_local_blocks=2),
]
TILES = [(32, 16), (16, 16), (32, 32), (64, 16), (16, 32), (8, 8)]


def _expand(tile_mask, block_m, block_n, seq_len):
    return tile_mask.repeat_interleave(block_m, 0)[:seq_len].repeat_interleave(block_n, 1)[:, :seq_len]


def _mask_from_bits(bits, pattern, block_m, block_n, seq_len):
    """Token mask rebuilt from the tile bits (the kernels' rule): kept sub-block pair & causal."""
    b = pattern.block_size
    rs, cs = min(b, block_m), min(b, block_n)
    pos = torch.arange(seq_len)
    qt, kt = pos // block_m, pos // block_n
    bit = ((pos % block_m) // rs)[:, None] * (block_n // cs) + ((pos % block_n) // cs)[None, :]
    kept = (bits[qt][:, kt] >> bit) & 1
    return kept.bool() & (pos[None, :] <= pos[:, None])


@pytest.mark.parametrize("pattern", SMALL_PATTERNS, ids=lambda p: p.mask_fn().__name__)
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("seq_len", [1, 37, 128, 200])
def test_tile_tables_reproduce_the_dense_mask(pattern, tiles, seq_len):
    block_m, block_n = tiles
    dense = independent_token_mask(pattern, seq_len)
    bits = tile_bits(pattern, seq_len, block_m=block_m, block_n=block_n, device="cpu")
    assert torch.equal(_mask_from_bits(bits, pattern, block_m, block_n, seq_len), dense)
    t = build_tile_tables(pattern, seq_len, block_m=block_m, block_n=block_n, device="cpu")
    for i in range(t.num_q_tiles):
        cnt, nfull = int(t.kv_cnt[i]), int(t.kv_full[i])
        listed = t.kv_idx[i, :cnt].tolist()
        assert sorted(listed) == torch.nonzero(bits[i]).flatten().tolist()
        assert listed[:nfull] == sorted(listed[:nfull]) and listed[nfull:] == sorted(listed[nfull:])
        for kt in listed[:nfull]:  # a full tile is attended everywhere: no mask may be skipped wrongly
            block = dense[i * block_m : (i + 1) * block_m, kt * block_n : (kt + 1) * block_n]
            assert block.shape == (block_m, block_n) and bool(block.all())
    for kt in range(t.num_k_tiles):  # the transposed table lists the same pairs
        listed = t.q_idx[kt, : int(t.q_cnt[kt])].tolist()
        assert sorted(listed) == torch.nonzero(bits[:, kt]).flatten().tolist()
    assert sorted(t.q_order.tolist()) == list(range(t.num_k_tiles))
    assert t.q_cnt[t.q_order.long()].tolist() == sorted(t.q_cnt.tolist(), reverse=True)


def test_tile_tables_reject_tiles_that_do_not_nest():
    with pytest.raises(ValueError, match="key tile 24 and pattern block 16"):
        tile_bits(SMALL_PATTERNS[0], 64, block_m=32, block_n=24, device="cpu")
    with pytest.raises(ValueError, match="at most 30"):
        tile_bits(SinkWindowPattern(block_size=16), 64, block_m=128, block_n=128, device="cpu")


def _tiles_of(num, idx, n_q, n_k):
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        out[i, idx[0, 0, i, : int(num[0, 0, i])].long()] = True
    return out


@pytest.mark.parametrize(
    "pattern, seq_len",
    [
        (SinkWindowPattern(), 64 * 130 + 5),  # past the window and the second stride block, ragged end
        (BlockStridedPattern(), 64 * 130 + 5),
        # debug_tiny's 16-token blocks in 128 x 128 tiles: 64 block pairs per tile (the Triton tile bits'
        # limit is 30; the Flex mask has none)
        (SinkWindowPattern(block_size=16, num_window_blocks=4), 1000),
        (BlockStridedPattern(block_size=16, stride_blocks=4, num_local_blocks=2), 1000),
        (SinkWindowPattern(block_size=48, num_window_blocks=3), 700),  # blocks and tiles do not nest
    ],
    ids=lambda x: x.mask_fn().__name__ if hasattr(x, "mask_fn") else str(x),
)
def test_flex_block_mask_covers_the_pattern_at_default_sizes(pattern, seq_len):
    mask = pattern_block_mask(pattern, seq_len, tile=(128, 128), device="cpu")
    n_t = -(-seq_len // 128)
    partial = _tiles_of(mask.kv_num_blocks, mask.kv_indices, n_t, n_t)
    full = _tiles_of(mask.full_kv_num_blocks, mask.full_kv_indices, n_t, n_t)
    assert not bool((partial & full).any())
    dense = independent_token_mask(pattern, seq_len)
    assert bool(_expand(full | partial, 128, 128, seq_len)[dense].all()), "a kept pair lies in a skipped tile"
    assert bool(dense[_expand(full, 128, 128, seq_len)].all()), "a full tile holds a masked pair"
    # Every listed tile holds a kept pair (no wasted tiles).
    for i, j in (full | partial).nonzero().tolist():
        assert bool(dense[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].any()), (i, j)
    # Sparsity is real: the 64-token sink + window row holds at most 18 tiles, not the causal ~n_t / 2.
    if pattern == SinkWindowPattern():
        assert int((full | partial).sum(dim=1).max()) <= 18


def _run(fn, q, k, v, d_out, d_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    return out, lse, q.grad, k.grad, v.grad


def _compare(got, ref, tol):
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, ref):
        err = (a.float() - b.float()).abs()
        assert err.max().item() <= tol, (
            f"{name}: max err {err.max().item():.3e}, mean {err.mean().item():.3e}"
        )


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    from torch.nn.attention import flex_attention as flex_mod

    monkeypatch.setattr(flex_mod, "_validate_device", lambda *args, **kwargs: None)


@pytest.mark.parametrize(
    "pattern", SMALL_PATTERNS[::2] + [SMALL_PATTERNS[3]], ids=lambda p: p.mask_fn().__name__
)
@pytest.mark.parametrize("seq_len", [53, 128])
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (128, 128)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_flex_eager_matches_oracle(flex_backward_on_cpu, pattern, seq_len, tiles):
    torch.manual_seed(seq_len)
    q = torch.randn(2, 4, seq_len, 16)
    k = torch.randn(2, 2, seq_len, 16)
    v = torch.randn(2, 2, seq_len, 16)
    d_out, d_lse = torch.randn_like(q), torch.randn(2, 4, seq_len)
    kernel = FlexSparseKernel(block_m=tiles[0], block_n=tiles[1], compiled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        got = _run(lambda q, k, v: kernel(q, k, v, pattern=pattern, softmax_scale=0.3), q, k, v, d_out, d_lse)
    mask = independent_token_mask(pattern, seq_len)
    ref = _run(lambda q, k, v: reference_attention(q, k, v, mask, softmax_scale=0.3), q, k, v, d_out, d_lse)
    assert got[1].dtype == torch.float32
    _compare(got, ref, 2e-5)


_TRITON_SCRIPT = r"""
import json, sys, torch
from megatron_longgen.attention.kernels.triton_block_sparse import LaunchConfig as L, TritonBlockSparseKernel, TritonConfig
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern
from megatron_longgen.attention.reference import reference_attention
from tests.attention.independent_masks import independent_token_mask

def run(fn, q, k, v, d_out, d_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    ((out.float() * d_out).sum() + (lse * d_lse).sum()).backward()
    return [out.float(), lse, q.grad.float(), k.grad.float(), v.grad.float()]

cases = [
    ("sink_window", SinkWindowPattern(block_size=16, num_window_blocks=3), 100, 4, 2, 32, None, "float32"),
    ("block_strided", BlockStridedPattern(block_size=16, stride_blocks=3, num_local_blocks=2), 100, 4, 2, 32, None, "float32"),
    ("sink_window_2x2_key_tiles", SinkWindowPattern(block_size=16, num_window_blocks=2), 77, 2, 1, 16,
     TritonConfig(fwd=L(32, 32), dq=L(16, 32), dkdv=L(32, 32)), "float32"),
    ("block_strided_fp16", BlockStridedPattern(block_size=16, stride_blocks=2), 64, 2, 2, 16, None, "float16"),
]
results = {}
for name, pattern, S, N, G, H, cfg, dtype in cases:
    torch.manual_seed(S)
    dt = getattr(torch, dtype)
    q, k, v = torch.randn(1, N, S, H).to(dt), torch.randn(1, G, S, H).to(dt), torch.randn(1, G, S, H).to(dt)
    d_out, d_lse = torch.randn(1, N, S, H), torch.randn(1, N, S)
    kernel = TritonBlockSparseKernel(config=cfg)
    got = run(lambda q, k, v: kernel(q, k, v, pattern=pattern), q, k, v, d_out, d_lse)
    mask = independent_token_mask(pattern, S)
    ref = run(lambda q, k, v: reference_attention(q.float(), k.float(), v.float(), mask), q, k, v, d_out, d_lse)
    results[name] = dict(dtype=dtype, lse_dtype=str(got[1].dtype),
                         errors=[(a - b).abs().max().item() for a, b in zip(got, ref)])

# The cudnn_bsa composition, with the oracle standing in for cuDNN's dense tiles: the Triton forward starts
# from the dense tiles' (out, lse) and the Triton backward adds its share into their gradients.
import math
from megatron_longgen.attention.kernels.cudnn_bsa import TileRemainder
from megatron_longgen.attention.kernels.triton_block_sparse import triton_backward, triton_forward
from megatron_longgen.attention.masks import dense_mask_from_rule

def dense_share_grads(q, k, v, out, lse, d_out, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.where(mask, torch.exp(s - lse[..., None]), torch.zeros_like(s))
    ds = p * (d_out @ v.transpose(-1, -2) - (d_out * out).sum(-1, keepdim=True))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ d_out

for name, pattern, tile, S in [
    ("split_sink_window_t32", SinkWindowPattern(block_size=16, num_window_blocks=5), 32, 160),
    ("split_sink_window_sink3_t32", SinkWindowPattern(block_size=16, num_sink_blocks=3, num_window_blocks=4), 32, 192),
    ("split_block_strided_t16", BlockStridedPattern(block_size=16, stride_blocks=3, num_local_blocks=2), 16, 144),
]:
    torch.manual_seed(S)
    N, H = 2, 32
    q, k, v, d_out = (torch.randn(1, N, S, H) for _ in range(4))
    scale = 1.0 / math.sqrt(H)
    rest = TileRemainder(pattern, tile)
    full_mask, rest_mask = independent_token_mask(pattern, S), dense_mask_from_rule(rest, S)
    dense_mask = full_mask & ~rest_mask
    kernel = TritonBlockSparseKernel()
    t_fwd, t_dq, t_kv = kernel.tables_for(rest, S, q.device)
    cfg = kernel.config_for(rest)
    o1, l1 = reference_attention(q, k, v, dense_mask)
    out, lse = triton_forward(q, k, v, t_fwd, cfg.fwd, scale, init=(o1.clone(), l1.clone()))
    ref = run(lambda q, k, v: reference_attention(q, k, v, full_mask), q, k, v, d_out, torch.zeros(1, N, S))
    grads = dense_share_grads(q, k, v, out, lse, d_out, dense_mask, scale)
    dq, dk, dv = triton_backward(q, k, v, out, lse, d_out, None, t_dq, t_kv, cfg, scale, accumulate=grads)
    results[name] = dict(dtype="float32", lse_dtype=str(lse.dtype), dense_share_pairs=int(dense_mask.sum()),
                         rest_pairs=int(rest_mask.sum()),
                         errors=[(a - b).abs().max().item() for a, b in zip([out, lse, dq, dk, dv], ref)])

# A deliberately wrong rule (window one block too wide; stride doubled) must make the kernel disagree with
# the independent oracle: the check above would catch such a bug (test_wrong_rule_fails_the_triton_check).
_right = {SinkWindowPattern: SinkWindowPattern.block_rule, BlockStridedPattern: BlockStridedPattern.block_rule}
SinkWindowPattern.block_rule = lambda self, qb, kb: (kb <= qb) & (
    (kb < self.num_sink_blocks) | (qb - kb < self.num_window_blocks + 1))
BlockStridedPattern.block_rule = lambda self, qb, kb: (kb <= qb) & (
    (qb - kb < self.num_local_blocks) | (kb % (2 * self.stride_blocks) == 0))
for name, pattern in [("wrong_window", SinkWindowPattern(block_size=16, num_window_blocks=2)),
                      ("wrong_stride", BlockStridedPattern(block_size=16, stride_blocks=2, num_local_blocks=1))]:
    torch.manual_seed(1)
    S = 96  # 6 blocks: past the window, 3 stride blocks
    q, k, v = (torch.randn(1, 1, S, 16) for _ in range(3))
    with torch.no_grad():
        got, _ = TritonBlockSparseKernel()(q, k, v, pattern=pattern)
        ref, _ = reference_attention(q, k, v, independent_token_mask(pattern, S))
    results[name] = dict(out_err=(got - ref).abs().max().item())
for cls, rule in _right.items():
    cls.block_rule = rule
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def triton_interpreter_results():
    require_triton_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS"))
    return json.loads(line[len("RESULTS") :])


@pytest.mark.parametrize(
    "case",
    [
        "sink_window", "block_strided", "sink_window_2x2_key_tiles", "block_strided_fp16",
        "split_sink_window_t32", "split_sink_window_sink3_t32", "split_block_strided_t16",
    ],
)  # fmt: skip
def test_triton_interpreter_matches_oracle(triton_interpreter_results, case):
    """The kernel alone, and (split_*) as the remainder of cudnn_bsa: starting from another kernel's
    (out, lse) over the dense tiles and adding into its gradients, the sum equals the full oracle."""
    res = triton_interpreter_results[case]
    assert res["lse_dtype"] == "torch.float32"
    # fp32 end to end: rounding only. fp16 inputs: the kernel rounds P and dS to fp16 before the
    # matmuls (as every flash kernel does), the oracle does not.
    tol = 2e-5 if res["dtype"] == "float32" else 2e-2
    if case.startswith("split_"):  # both shares must be non-trivial, or the composition is untested
        assert res["dense_share_pairs"] > 0 and res["rest_pairs"] > 0
    for what, err in zip(["out", "lse", "dq", "dk", "dv"], res["errors"]):
        assert err <= tol, f"{case} {what}: max err {err:.3e} > {tol}"


@pytest.mark.parametrize("case", ["wrong_window", "wrong_stride"])
def test_wrong_rule_fails_the_triton_check(triton_interpreter_results, case):
    """With a wrong rule patched in, the Triton kernel's output differs from the independent oracle far
    beyond the tolerance of test_triton_interpreter_matches_oracle (so that test would fail)."""
    out_err = triton_interpreter_results[case]["out_err"]
    assert out_err > 1e-2, f"{case}: the wrong rule went unnoticed (max out err {out_err:.3e})"


def test_kernels_reject_unequal_lengths():
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError, match="64 and 32"):
        FlexSparseKernel(compiled=False)(q, k, k, pattern=SMALL_PATTERNS[0])
    from megatron_longgen.attention.kernels.triton_block_sparse import TritonBlockSparseKernel

    with pytest.raises(ValueError, match="64 and 32"):
        TritonBlockSparseKernel()(q, k, k, pattern=SMALL_PATTERNS[0])
