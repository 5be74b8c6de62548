"""Sparse layers under context parallelism: fetch only the key/value blocks a rank's queries can see.

Legend: B = batch, N = query heads, G = KV heads, H = head dim, S = global sequence, R = CP world size,
r = rank in the CP group, b = sparse block size, nB = S/b global blocks, L = local blocks (S/(R*b)),
F = fetched (remote) blocks, T = L*b + F*b keys after the exchange.

Transformer Engine and torch all-gather the whole K/V (or all-to-all the heads) for sliding-window
layers. LongGen's patterns need far less: with the zig-zag layout (`sharding.py`) a rank's queries see

    sink_window:    the sink block(s) + the (num_window_blocks - 1) blocks before each of its two chunks
    block_strided:  every stride_blocks-th block before its chunks + (num_local_blocks - 1) halo blocks

and only the blocks of those that another rank owns are moved. Which blocks rank p needs from rank q is a
pure function of (pattern, R, S), so both sides compute the same plan (`plan_sparse_exchange`) and no
metadata is exchanged. Example, sink_window b=64 with 32 window blocks, S = 128K, R = 2: rank 0 fetches
31 blocks (1,984 tokens), rank 1 fetches 32 (2,048), against 65,536 tokens for an all-gather of K/V.

The exchange is an autograd function: the backward sends the fetched blocks' dK/dV back to their owners,
which add them into their local gradients (no `torch.distributed.nn`). Attention then runs on
[local blocks | fetched blocks] with a per-query-block key table and the tokens' *global* positions for
the causal rule. Two kernels (`kernel=`): `torch`, i.e. `block_sparse_attention_torch` (any device,
recomputing backward, differentiable through lse too), and `flex`, a compiled FlexAttention with a block
mask built from the same table (`flex_sparse.py`, CUDA). `auto` takes `flex` where it can run, else
`torch`, and logs the choice once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.distributed as dist

from megatron_longgen.attention.kernels.torch_block import block_sparse_attention_torch
from megatron_longgen.attention.masks import SparsePattern, mask_matrix_to_table
from megatron_longgen.context_parallel.ring_comm import (
    TAG_HALO,
    TAG_HALO_GRAD,
    exchange_blocks,
    group_rank_and_size,
)
from megatron_longgen.context_parallel.sharding import block_owner, check_cp_divisibility, rank_block_ids
from megatron_longgen.context_parallel.step_kernels import default_scale

logger = logging.getLogger(__name__)
SPARSE_CP_KERNELS = ("auto", "torch", "flex")
_LOGGED: set = set()


@dataclass(frozen=True, kw_only=True)
class SparseExchangePlan:
    """Everything rank `cp_rank` needs to run one sparse layer under CP (CPU int64 tensors)."""

    cp_rank: int
    cp_size: int
    seq_len: int
    block_size: int
    recv_blocks: dict[int, torch.Tensor] = field(repr=False)
    """peer -> the peer's local block indices this rank receives, in key order."""
    send_blocks: dict[int, torch.Tensor] = field(repr=False)
    """peer -> this rank's local block indices the peer needs, in the peer's key order."""
    q_positions: torch.Tensor = field(repr=False)
    """[L*b] global positions of the local tokens."""
    k_positions: torch.Tensor = field(repr=False)
    """[T] global positions of [local | fetched] keys."""
    kv_table: torch.Tensor = field(repr=False)
    """[L, W] per local query block, indices of kept key blocks in [local | fetched] (-1 padded)."""

    @property
    def num_fetched_blocks(self) -> int:
        return sum(int(v.numel()) for v in self.recv_blocks.values())

    @property
    def num_sent_blocks(self) -> int:
        return sum(int(v.numel()) for v in self.send_blocks.values())

    def forward_bytes(self, *, batch: int, kv_heads: int, head_dim: int, element_size: int) -> dict[str, int]:
        """Bytes this rank sends and receives in the forward (K and V); the backward moves the same
        amounts the other way (dK/dV in the gradients' dtype)."""
        per_block = 2 * batch * kv_heads * self.block_size * head_dim * element_size
        return {"sent": self.num_sent_blocks * per_block, "received": self.num_fetched_blocks * per_block}


def _needed_blocks(
    pattern: SparsePattern, *, cp_rank: int, cp_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [L, nB] block mask of this rank's query blocks, sorted global ids of all needed key blocks)."""
    b = pattern.block_size
    q_blocks = rank_block_ids(cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len, block_size=b)
    keep = pattern.block_rule(q_blocks[:, None], torch.arange(seq_len // b)[None, :])
    return keep, keep.any(dim=0).nonzero().flatten()


def _remote_by_owner(needed: torch.Tensor, *, cp_rank: int, cp_size: int, seq_len: int, block_size: int):
    owner, local = block_owner(block=needed, cp_size=cp_size, seq_len=seq_len, block_size=block_size)
    return {p: (needed[owner == p], local[owner == p]) for p in range(cp_size) if p != cp_rank}


@lru_cache(maxsize=64)
def plan_sparse_exchange(
    pattern: SparsePattern, *, cp_rank: int, cp_size: int, seq_len: int
) -> SparseExchangePlan:
    """The exchange and key layout for `pattern` on rank `cp_rank` of `cp_size` (pure, cached).

    Raises ValueError when `seq_len` is not a multiple of 2*cp_size*block_size.
    """
    b = pattern.block_size
    check_cp_divisibility(seq_len=seq_len, cp_size=cp_size, block_size=b)
    keep, needed = _needed_blocks(pattern, cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len)
    mine = _remote_by_owner(needed, cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len, block_size=b)
    local_ids = rank_block_ids(cp_rank=cp_rank, cp_size=cp_size, seq_len=seq_len, block_size=b)
    # Key layout: this rank's blocks in local order, then the fetched blocks grouped by peer (ascending).
    key_index = torch.full((seq_len // b,), -1, dtype=torch.int64)
    key_index[local_ids] = torch.arange(local_ids.numel())
    fetched_ids = [mine[p][0] for p in sorted(mine)]
    all_fetched = torch.cat(fetched_ids) if fetched_ids else torch.empty(0, dtype=torch.int64)
    key_index[all_fetched] = local_ids.numel() + torch.arange(all_fetched.numel())
    key_blocks = torch.cat([local_ids, all_fetched])
    table_global = mask_matrix_to_table(keep)
    table = torch.where(
        table_global >= 0, key_index[table_global.clamp(min=0)], torch.full_like(table_global, -1)
    )
    assert bool(((table >= 0) == (table_global >= 0)).all()), "a kept key block was neither local nor fetched"
    send = {}
    for peer in range(cp_size):
        if peer == cp_rank:
            continue
        _, peer_needed = _needed_blocks(pattern, cp_rank=peer, cp_size=cp_size, seq_len=seq_len)
        theirs = _remote_by_owner(peer_needed, cp_rank=peer, cp_size=cp_size, seq_len=seq_len, block_size=b)
        send[peer] = theirs[cp_rank][1]
    ar = torch.arange(b)
    return SparseExchangePlan(
        cp_rank=cp_rank,
        cp_size=cp_size,
        seq_len=seq_len,
        block_size=b,
        recv_blocks={p: mine[p][1] for p in sorted(mine)},
        send_blocks=send,
        q_positions=(local_ids[:, None] * b + ar).flatten(),
        k_positions=(key_blocks[:, None] * b + ar).flatten(),
        kv_table=table,
    )


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


def sparse_cp_attention(
    q_BNSH: torch.Tensor,
    k_BGSH: torch.Tensor,
    v_BGSH: torch.Tensor,
    *,
    pattern: SparsePattern,
    cp_group: dist.ProcessGroup,
    softmax_scale: float | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static sparse causal attention over a zig-zag sharded sequence, exchanging only needed blocks.

    Args:
        q_BNSH, k_BGSH, v_BGSH: this rank's shard (S local = global / R, `sharding.py` layout).
        pattern: the layer's `SinkWindowPattern` / `BlockStridedPattern` (block size b).
        cp_group: the context-parallel group (R = its size; R = 1 runs without communication).
        softmax_scale: defaults to 1/sqrt(H).
        kernel: `auto`, `torch` or `flex` (module docstring); an explicit `flex` that cannot run raises.

    Returns:
        out_BNSH (input dtype) and lse_BNS (fp32), differentiable w.r.t. q, k, v (lse only with the
        `torch` kernel). Collective over
        `cp_group`; the global length R*S must be a multiple of 2*R*b (ValueError otherwise).
    """
    rank, world = group_rank_and_size(cp_group)
    S = q_BNSH.shape[2]
    if k_BGSH.shape[2] != S or v_BGSH.shape != k_BGSH.shape:
        raise ValueError(
            f"q/k/v local lengths differ: q {tuple(q_BNSH.shape)}, k {tuple(k_BGSH.shape)}, "
            f"v {tuple(v_BGSH.shape)}"
        )
    if kernel not in SPARSE_CP_KERNELS:
        raise ValueError(f"sparse CP kernel must be one of {SPARSE_CP_KERNELS}, got {kernel!r}")
    plan = plan_sparse_exchange(pattern, cp_rank=rank, cp_size=world, seq_len=S * world)
    chosen = _choose_kernel(kernel, plan, q_BNSH.device)
    k_all, v_all = k_BGSH, v_BGSH
    if world > 1:
        k_f, v_f = _FetchBlocks.apply(k_BGSH, v_BGSH, plan, cp_group)
        k_all, v_all = torch.cat([k_BGSH, k_f], dim=2), torch.cat([v_BGSH, v_f], dim=2)
    scale = default_scale(q_BNSH.shape[-1], softmax_scale)
    if chosen == "flex":
        from megatron_longgen.context_parallel.flex_sparse import flex_cp_attention

        return flex_cp_attention(q_BNSH, k_all, v_all, plan=plan, softmax_scale=scale)
    return block_sparse_attention_torch(
        q_BNSH,
        k_all,
        v_all,
        kv_table=plan.kv_table,
        block_size=pattern.block_size,
        q_positions=plan.q_positions,
        k_positions=plan.k_positions,
        softmax_scale=scale,
    )


def _choose_kernel(kernel: str, plan: SparseExchangePlan, device: torch.device) -> str:
    from megatron_longgen.context_parallel.flex_sparse import flex_unavailable_reason

    reason = (
        flex_unavailable_reason(plan=plan, device=device) if kernel in ("auto", "flex") else "not requested"
    )
    if kernel == "flex" and reason is not None:
        raise ValueError(f"sparse CP kernel 'flex' cannot run: {reason}")
    chosen = "flex" if reason is None else "torch"
    key = (kernel, chosen, device.type)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(
            "sparse CP attention kernel: %s (requested %s; %s)", chosen, kernel, reason or "available"
        )
    return chosen
