"""Sparse layers under context parallelism: fetch only the key/value blocks a rank's queries can see.

Legend: B = batch, N = query heads, G = KV heads, H = head dim, S = local queries (global / R), R = CP
world size, b = sparse block size, T = keys after the exchange ([local | fetched] blocks).

Transformer Engine and torch all-gather the whole K/V (or all-to-all the heads) for sliding-window
layers. LongGen's patterns need far less: `exchange_plan.py` says which blocks each rank needs (the sink,
the window halo, the strided blocks) and where they land; this module moves them and runs attention.

The exchange is an autograd function: the backward sends the fetched blocks' dK/dV back to their owners,
which add them into their local gradients (no `torch.distributed.nn`). Attention then runs on
[local blocks | fetched blocks] with the plan's per-query-block key table and the tokens' *global*
positions for the causal rule, through one of two kernels (`EXCHANGE_KERNELS`, chosen by
`attention/backends.py`):

- `torch`: `block_sparse_attention_torch` (any device; recomputing backward);
- `flex`:  compiled FlexAttention with a block mask built from the same table
           (`attention/kernels/flex.py:flex_block_mask`, CUDA).

Both return (out, lse) differentiable through both outputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_longgen.attention.kernels.flex import (
    FLEX_TILE,
    flex_attention_lse,
    flex_block_mask,
    flex_unavailable_reason,
)
from megatron_longgen.attention.kernels.torch_block import block_sparse_attention_torch
from megatron_longgen.attention.masks import SparsePattern
from megatron_longgen.context_parallel.exchange_plan import SparseExchangePlan, plan_sparse_exchange
from megatron_longgen.context_parallel.ring_comm import (
    TAG_HALO,
    TAG_HALO_GRAD,
    exchange_blocks,
    group_rank_and_size,
)
from megatron_longgen.context_parallel.step_kernels import default_scale

EXCHANGE_KERNELS = ("flex", "torch")
"""Kernels over [local | fetched] keys, fastest first."""


class _FetchBlocks(torch.autograd.Function):
    """K/V of the remote blocks a plan lists; backward returns their gradients to the owners."""

    @staticmethod
    def forward(ctx, k, v, plan: SparseExchangePlan, group):
        B, G, S, H = k.shape
        b = plan.block_size
        kv = torch.stack([k, v]).view(2, B, G, S // b, b, H)
        dev = k.device
        sends = {p: kv[:, :, :, idx.to(dev)] for p, idx in plan.send_blocks.items()}
        shapes = {p: (2, B, G, int(idx.numel()), b, H) for p, idx in plan.recv_blocks.items()}
        got = exchange_blocks(sends, shapes, group=group, dtype=k.dtype, device=dev, tag=TAG_HALO)
        parts = [got[p] for p in sorted(got)]
        fetched = torch.cat(parts, dim=3) if parts else kv.new_zeros(2, B, G, 0, b, H)
        fetched = fetched.view(2, B, G, -1, H)
        ctx.plan, ctx.group, ctx.shape = plan, group, (B, G, S, H)
        return fetched[0], fetched[1]

    @staticmethod
    def backward(ctx, dk_f, dv_f):
        plan, group = ctx.plan, ctx.group
        B, G, S, H = ctx.shape
        b = plan.block_size
        dev = dk_f.device
        dkv_f = torch.stack([dk_f, dv_f]).view(2, B, G, -1, b, H)
        sends, start = {}, 0
        for p in sorted(plan.recv_blocks):
            n = int(plan.recv_blocks[p].numel())
            sends[p] = dkv_f[:, :, :, start : start + n]
            start += n
        shapes = {p: (2, B, G, int(idx.numel()), b, H) for p, idx in plan.send_blocks.items()}
        got = exchange_blocks(sends, shapes, group=group, dtype=dkv_f.dtype, device=dev, tag=TAG_HALO_GRAD)
        dkv = torch.zeros(2, B, G, S // b, b, H, dtype=torch.float32, device=dev)
        for p, grads in got.items():
            dkv.index_add_(3, plan.send_blocks[p].to(dev), grads.float())
        dkv = dkv.view(2, B, G, S, H).to(dk_f.dtype)
        return dkv[0], dkv[1], None, None


_FLEX_MASKS: dict[tuple, tuple] = {}


def exchange_block_mask(plan: SparseExchangePlan, device: torch.device, *, tile: int = FLEX_TILE):
    """The Flex `BlockMask` of `plan` on `device` (cached; plans are cached per layer shape, so this stays
    small). The plan is kept in the cache entry so that its id stays unique."""
    key = (id(plan), str(device), tile)
    if key not in _FLEX_MASKS:
        mask = flex_block_mask(
            plan.keep_matrix(device),
            block_size=plan.block_size,
            q_positions=plan.q_positions.to(device),
            k_positions=plan.k_positions.to(device),
            tile=(tile, tile),
        )
        _FLEX_MASKS[key] = (plan, mask)
    return _FLEX_MASKS[key][1]


def attend_exchanged(
    q_BNSH: torch.Tensor,
    k_BGTH: torch.Tensor,
    v_BGTH: torch.Tensor,
    *,
    plan: SparseExchangePlan,
    kernel: str,
    softmax_scale: float | None = None,
    compiled: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the local queries over [local | fetched] keys laid out as `plan` says, no communication.

    `kernel` is `torch` or `flex` (`compiled` None = compiled on CUDA; False runs Flex eagerly, [S, T]
    scores: tests). Returns (out_BNSH in the input dtype, lse_BNS fp32), differentiable w.r.t. q, k, v.
    """
    scale = default_scale(q_BNSH.shape[-1], softmax_scale)
    if kernel == "flex":
        mask = exchange_block_mask(plan, q_BNSH.device)
        return flex_attention_lse(
            q_BNSH, k_BGTH, v_BGTH, block_mask=mask, softmax_scale=scale, compiled=compiled
        )
    if kernel == "torch":
        return block_sparse_attention_torch(
            q_BNSH,
            k_BGTH,
            v_BGTH,
            kv_table=plan.kv_table,
            block_size=plan.block_size,
            q_positions=plan.q_positions,
            k_positions=plan.k_positions,
            softmax_scale=scale,
        )
    raise ValueError(f"sparse CP kernel must be one of {EXCHANGE_KERNELS}, got {kernel!r}")


def sparse_cp_attention(
    q_BNSH: torch.Tensor,
    k_BGSH: torch.Tensor,
    v_BGSH: torch.Tensor,
    *,
    pattern: SparsePattern,
    cp_group: dist.ProcessGroup,
    kernel: str,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static sparse causal attention over a zig-zag sharded sequence, exchanging only needed blocks.

    Args:
        q_BNSH, k_BGSH, v_BGSH: this rank's shard (S local = global / R, `sharding.py` layout).
        pattern: the layer's `SinkWindowPattern` / `BlockStridedPattern` (block size b).
        cp_group: the context-parallel group (R = its size; R = 1 runs without communication).
        kernel: `torch` or `flex` (`EXCHANGE_KERNELS`; `attention/backends.py` resolves `auto`). One that
            cannot run here raises ValueError before any communication.
        softmax_scale: defaults to 1/sqrt(H).

    Returns:
        out_BNSH (input dtype) and lse_BNS (fp32), differentiable w.r.t. q, k, v. Collective over
        `cp_group`; the global length R*S must be a multiple of 2*R*b (ValueError otherwise).
    """
    rank, world = group_rank_and_size(cp_group)
    S = q_BNSH.shape[2]
    if k_BGSH.shape[2] != S or v_BGSH.shape != k_BGSH.shape:
        raise ValueError(
            f"q/k/v local lengths differ: q {tuple(q_BNSH.shape)}, k {tuple(k_BGSH.shape)}, "
            f"v {tuple(v_BGSH.shape)}"
        )
    if kernel not in EXCHANGE_KERNELS:
        raise ValueError(f"sparse CP kernel must be one of {EXCHANGE_KERNELS}, got {kernel!r}")
    if kernel == "flex":
        reason = flex_unavailable_reason(device=q_BNSH.device, dtype=q_BNSH.dtype, pattern=pattern)
        if reason is not None:
            raise ValueError(f"sparse CP kernel 'flex' cannot run: {reason}")
    plan = plan_sparse_exchange(pattern, cp_rank=rank, cp_size=world, seq_len=S * world)
    k_all, v_all = k_BGSH, v_BGSH
    if world > 1:
        k_f, v_f = _FetchBlocks.apply(k_BGSH, v_BGSH, plan, cp_group)
        k_all, v_all = torch.cat([k_BGSH, k_f], dim=2), torch.cat([v_BGSH, v_f], dim=2)
    return attend_exchanged(q_BNSH, k_all, v_all, plan=plan, kernel=kernel, softmax_scale=softmax_scale)
