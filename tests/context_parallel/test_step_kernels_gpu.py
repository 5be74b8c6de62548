"""Single-GPU checks of every ring step kernel (`context_parallel/step_kernels.py`) against the math kernel.

Legend: B = batch, N = query heads, G = KV heads, S = query length, T = key length, H = head dim.

A ring step kernel must (1) return the step's output and its fp32 log-sum-exp, and (2) have a backward
that, given the *final* (merged) out and lse of all steps, returns that step's exact share of dQ/dK/dV.
Each fast kernel (cuDNN, flash; bf16) is compared with the fp32 math kernel on the same bf16-rounded
inputs, on the shapes ring attention uses: the causal square diagonal step, and the two non-causal
rectangular steps (all local queries x one key chunk; one query chunk x all keys), MHA and GQA:

- forward: out and lse of one step;
- backward, the ring's way: keys split into two steps, each step's backward run with the merged out /
  lse; the two shares summed (dQ) or concatenated (dK/dV) must equal the math kernel's, and the math
  kernel's must equal autograd through the dense oracle on all keys (so the contract itself is tested).

Criterion (STYLE rule 5): err(fast vs fp32) <= 2 x err(naive bf16 oracle vs fp32) for out and lse,
3 x for the gradients, with failures printing max and mean.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longgen.attention.reference import reference_attention
from megatron_longgen.context_parallel.step_kernels import STEP_KERNELS, MathStepKernel

pytestmark = pytest.mark.gpu

FAST = [name for name in STEP_KERNELS if name != "math"]
SHAPES = [(8, 8, 128), (8, 2, 64)]  # (N, G, H)
# (S, T, causal): the ring's diagonal step, and the two off-diagonal steps of the zig-zag layout
STEPS = [(512, 512, True), (512, 256, False), (256, 512, False)]
SCALE = 0.09


def _available(name):
    reason = STEP_KERNELS[name].unavailable_reason(device=torch.device("cuda"), dtype=torch.bfloat16)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return STEP_KERNELS[name]()


def _inputs(N, G, H, S, T, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2, N, S, H, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, G, T, H, device="cuda", generator=g).bfloat16()
    v = torch.randn(2, G, T, H, device="cuda", generator=g).bfloat16()
    d_out = torch.randn(2, N, S, H, device="cuda", generator=g).bfloat16()
    return q, k, v, d_out


def _mask(S, T, causal):
    if not causal:
        return None
    return torch.ones(S, T, dtype=torch.bool, device="cuda").tril()  # top-left aligned (S == T here)


def _check(name, fast, gold, naive, factor):
    err = (fast.float() - gold.float()).abs()
    base = (naive.float() - gold.float()).abs().max().item()
    assert err.max().item() <= factor * base + 1e-6, (
        f"{name}: max err {err.max().item():.3e} (mean {err.mean().item():.3e}) > {factor} x naive bf16 err {base:.3e}"
    )


def _oracle_grads(q, k, v, d_out, mask, dtype):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference_attention(qq, kk, vv, mask, softmax_scale=SCALE)
    out.backward(d_out.to(dtype))
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}G{s[1]}H{s[2]}")
@pytest.mark.parametrize("step", STEPS, ids=lambda s: f"S{s[0]}T{s[1]}{'causal' if s[2] else ''}")
def test_forward_matches_math_kernel(name, shape, step):
    kernel = _available(name)
    (N, G, H), (S, T, causal) = shape, step
    q, k, v, _ = _inputs(N, G, H, S, T, seed=S + T + N)
    out, lse = kernel.forward(q, k, v, causal=causal, scale=SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, N, S) and lse.dtype == torch.float32
    gold_out, gold_lse = MathStepKernel().forward(q.float(), k.float(), v.float(), causal=causal, scale=SCALE)
    naive_out, naive_lse = reference_attention(q, k, v, _mask(S, T, causal), softmax_scale=SCALE)
    _check(f"{name} out", out, gold_out, naive_out, 2)
    _check(f"{name} lse", lse, gold_lse, naive_lse, 2)


@pytest.mark.parametrize("name", ["math", *FAST])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}G{s[1]}H{s[2]}")
def test_backward_with_merged_lse_gives_each_steps_exact_share(name, shape):
    """Keys [0, T) split into two non-causal steps [0, T/2) and [T/2, T), as ring attention does: each
    step's backward takes the merged out / lse, and the shares add up to the gradient over all keys."""
    kernel = _available(name) if name != "math" else MathStepKernel()
    N, G, H = shape
    S, T = 256, 512
    q, k, v, d_out = _inputs(N, G, H, S, T, seed=N + H)
    gold = _oracle_grads(q, k, v, d_out, None, torch.float32)
    naive = _oracle_grads(q, k, v, d_out, None, torch.bfloat16)
    # Merged out / lse over both steps, computed by the kernel itself (as in the ring's forward).
    halves = (slice(0, T // 2), slice(T // 2, T))
    parts = [kernel.forward(q, k[:, :, h], v[:, :, h], causal=False, scale=SCALE) for h in halves]
    lse = torch.logaddexp(parts[0][1].float(), parts[1][1].float())
    out = sum(o.float() * torch.exp(l.float() - lse).unsqueeze(-1) for o, l in parts).to(q.dtype)
    dq = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    dk, dv = [], []
    for h in halves:
        dq_s, dk_s, dv_s = kernel.backward(
            d_out, q, k[:, :, h], v[:, :, h], out, lse, causal=False, scale=SCALE
        )
        assert dk_s.shape == (2, G, T // 2, H)  # K/V gradients come back with G heads (GQA)
        dq += dq_s.float()
        dk.append(dk_s.float())
        dv.append(dv_s.float())
    _check(f"{name} merged out", out, gold[0], naive[0], 2)
    _check(f"{name} merged lse", lse, gold[1], naive[1], 2)
    for what, got, i in (("dq", dq, 2), ("dk", torch.cat(dk, dim=2), 3), ("dv", torch.cat(dv, dim=2), 4)):
        _check(f"{name} {what}", got, gold[i], naive[i], 3)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}G{s[1]}H{s[2]}")
def test_causal_diagonal_step_backward(name, shape):
    """The diagonal step alone (its own out / lse are the final ones): gradients against the oracle."""
    kernel = _available(name)
    N, G, H = shape
    S = 512
    q, k, v, d_out = _inputs(N, G, H, S, S, seed=7 + N)
    mask = _mask(S, S, True)
    gold = _oracle_grads(q, k, v, d_out, mask, torch.float32)
    naive = _oracle_grads(q, k, v, d_out, mask, torch.bfloat16)
    out, lse = kernel.forward(q, k, v, causal=True, scale=SCALE)
    grads = kernel.backward(d_out, q, k, v, out, lse, causal=True, scale=SCALE)
    for what, got, i in zip(("dq", "dk", "dv"), grads, (2, 3, 4)):
        _check(f"{name} causal {what}", got, gold[i], naive[i], 3)
