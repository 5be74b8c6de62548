"""Zig-zag ring attention for full (dense causal) layers.

Legend: B = batch, N = query heads, G = KV heads, S = local sequence (= global / R), c = S/2 tokens per
zig-zag chunk, H = head dim, R = CP world size, r = rank within the CP group, s = ring step.

Each rank holds chunks (r, 2R-1-r) of Q, K and V (`sharding.py`). K/V travel around the ring (rank r
sends to r+1); at step s rank r holds the K/V of rank src = (r - s) mod R. With the zig-zag layout the
causal structure of each step is known from (r, src) alone, and every step costs the same::

    s = 0 (src == r):  local causal attention over [chunk r | chunk 2R-1-r]   (square, causal)
    src < r:           all local queries  x  K/V chunk src only               (its chunk 2R-1-src is
                                                                               in everybody's future)
    src > r:           local chunk 2R-1-r only  x  all of src's K/V         (chunk r precedes both)

so the fully masked quarter of every off-diagonal step is never computed.

Forward: the transfer of the next K/V buffer is started before the current step's kernel runs and waited
for after it (double buffering), and partial results are merged in fp32 with their log-sum-exps::

    lse' = logaddexp(lse, lse_s);  out' = exp(lse - lse') * out + exp(lse_s - lse') * out_s

Backward: dQ stays local; dK/dV (fp32) for the K/V block a rank currently holds are accumulated into a
buffer that travels around the ring with that block and arrives back at its owner after R hops. The step
kernels' backward takes the merged out and lse, which makes each step's gradients exact contributions.
The per-step kernel is a `DenseStepKernel` (`step_kernels.py`): cuDNN / flash on GPU, fp32 math on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longgen.context_parallel.ring_comm import TAG_DKV, TAG_KV, RingComm, group_rank_and_size
from megatron_longgen.context_parallel.step_kernels import DenseStepKernel, default_scale, step_kernel


def ring_step_layout(*, cp_rank: int, src_rank: int, chunk_len: int) -> tuple[slice, slice, bool]:
    """(local query slice, key slice of the held K/V, causal) for one ring step of the zig-zag layout."""
    c = chunk_len
    if src_rank == cp_rank:
        return slice(0, 2 * c), slice(0, 2 * c), True
    if src_rank < cp_rank:
        return slice(0, 2 * c), slice(0, c), False
    return slice(c, 2 * c), slice(0, 2 * c), False


def _merge_(
    out_BNSH: torch.Tensor, lse_BNS: torch.Tensor, blk_out_BNSH: torch.Tensor, blk_lse_BNS: torch.Tensor
):
    """In-place fp32 log-sum-exp merge of one step's partial result into the running one."""
    new_lse = torch.logaddexp(lse_BNS, blk_lse_BNS.float())
    out_BNSH.mul_(torch.exp(lse_BNS - new_lse).unsqueeze(-1))
    out_BNSH.add_(blk_out_BNSH.float() * torch.exp(blk_lse_BNS.float() - new_lse).unsqueeze(-1))
    lse_BNS.copy_(new_lse)


class _ZigZagRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, kernel: DenseStepKernel, scale: float):
        rank, world = group_rank_and_size(group)
        c = q.shape[2] // 2
        comm = RingComm(group) if world > 1 else None
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(world):
            pending = comm.start(kv, tag=TAG_KV) if step + 1 < world else None
            src = (rank - step) % world
            qs, ks, causal = ring_step_layout(cp_rank=rank, src_rank=src, chunk_len=c)
            blk_out, blk_lse = kernel.forward(
                q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], causal=causal, scale=scale
            )
            _merge_(out[:, :, qs], lse[:, :, qs], blk_out, blk_lse)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.kernel, ctx.scale = group, kernel, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group, kernel, scale = ctx.group, ctx.kernel, ctx.scale
        rank, world = group_rank_and_size(group)
        c = q.shape[2] // 2
        comm = RingComm(group) if world > 1 else None
        d_out = d_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv_pending = None
        for step in range(world):
            kv_pending = comm.start(kv, tag=TAG_KV) if step + 1 < world else None
            src = (rank - step) % world
            qs, ks, causal = ring_step_layout(cp_rank=rank, src_rank=src, chunk_len=c)
            dq_s, dk_s, dv_s = kernel.backward(
                d_out[:, :, qs],
                q[:, :, qs],
                kv[0][:, :, ks],
                kv[1][:, :, ks],
                out[:, :, qs],
                lse[:, :, qs],
                causal=causal,
                scale=scale,
            )
            dq[:, :, qs] += dq_s.float()
            # The gradient buffer of the held block: what earlier ranks accumulated plus this step.
            dkv = (
                dkv_pending.wait()
                if dkv_pending is not None
                else torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            )
            dkv[0][:, :, ks] += dk_s.float()
            dkv[1][:, :, ks] += dv_s.float()
            if comm is not None:
                dkv_pending = comm.start(dkv, tag=TAG_DKV)  # after R hops it is back at its owner
            if kv_pending is not None:
                kv = kv_pending.wait()
        dkv = dkv_pending.wait() if dkv_pending is not None else dkv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(
    q_BNSH: torch.Tensor,
    k_BGSH: torch.Tensor,
    v_BGSH: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup,
    kernel: DenseStepKernel | str,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over a zig-zag sharded sequence, K/V rotating around `cp_group`.

    Args:
        q_BNSH, k_BGSH, v_BGSH: this rank's shard (chunks r and 2R-1-r concatenated, `sharding.py`);
            S must be even and equal on all ranks; G must divide N (GQA: K/V travel with G heads).
        cp_group: the context-parallel group (R = its size; R = 1 is plain causal attention).
        kernel: a `DenseStepKernel`, or the name of one (`cudnn`, `flash`, `math`; ValueError if it cannot
            run here). `attention/backends.py` resolves `auto`.
        softmax_scale: defaults to 1/sqrt(H).

    Returns:
        out_BNSH (input dtype; differentiable w.r.t. q, k, v) and lse_BNS (fp32, not differentiable).
        Collective: every rank of `cp_group` must call it with the same shapes.
    """
    _rank, world = group_rank_and_size(cp_group)
    S = q_BNSH.shape[2]
    if S % 2:
        raise ValueError(f"local sequence {S} must be even (two zig-zag chunks per rank, cp {world})")
    if k_BGSH.shape[2] != S or v_BGSH.shape != k_BGSH.shape:
        raise ValueError(
            f"q/k/v local lengths differ: q {tuple(q_BNSH.shape)}, k {tuple(k_BGSH.shape)}, "
            f"v {tuple(v_BGSH.shape)}"
        )
    if q_BNSH.shape[1] % k_BGSH.shape[1]:
        raise ValueError(f"query heads {q_BNSH.shape[1]} must be a multiple of kv heads {k_BGSH.shape[1]}")
    if isinstance(kernel, str):
        kernel = step_kernel(kernel, device=q_BNSH.device, dtype=q_BNSH.dtype)
    scale = default_scale(q_BNSH.shape[-1], softmax_scale)
    return _ZigZagRingAttention.apply(q_BNSH, k_BGSH, v_BGSH, cp_group, kernel, scale)
