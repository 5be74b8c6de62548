"""Point-to-point communication for context parallelism, over an explicitly passed process group.

Legend: R = CP world size, r = rank within the CP group.

Two primitives, both plain tensors in and out (the autograd functions in `ring_attention.py` and
`sparse_exchange.py` call them from their forward and backward; we do not rely on
`torch.distributed.nn`, whose all-gather gave wrong K/V gradients on gloo, see notes/feasibility_cpu.md):

- `RingComm.start(tensor)`: send to the next rank and receive the same-shaped tensor from the previous
  one, asynchronously (`batch_isend_irecv`). The caller computes while the transfer runs and calls
  `wait()` on the returned handle (double buffering: the tensor in flight is never written).
- `exchange_blocks(sends, recv_shapes, ...)`: each rank sends a (possibly empty) tensor to every other
  rank and receives one from each; sizes are known on both sides in advance because the index maths is
  a pure function of (rank, R, S, b) (see `exchange_plan.py`), so no metadata is exchanged.

Neighbours and peers are ranks *within* the group, translated with `dist.get_global_rank`. Messages carry
a per-purpose tag so that two transfers in flight between the same pair can never be confused on gloo
(NCCL orders them by issue order, which is identical on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TAG_KV = 11
TAG_DKV = 12
TAG_HALO = 13
TAG_HALO_GRAD = 14


def group_rank_and_size(group: dist.ProcessGroup) -> tuple[int, int]:
    """(rank within `group`, size of `group`); raises ValueError if this process is not a member."""
    if group is None:
        raise ValueError("a context-parallel process group is required (got None)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the CP group")
    return rank, dist.get_world_size(group)


class _Pending:
    """An in-flight receive: `wait()` returns the received tensor once all requests completed."""

    def __init__(self, reqs, result: torch.Tensor):
        self._reqs, self._result = reqs, result

    def wait(self) -> torch.Tensor:
        for req in self._reqs:
            req.wait()
        self._reqs = []
        return self._result


class RingComm:
    """Ring neighbours in a CP group: send to rank r+1, receive from rank r-1 (mod R)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.next_global = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
        self.prev_global = dist.get_global_rank(group, (self.rank - 1) % self.world_size)

    def start(self, send: torch.Tensor, *, tag: int) -> _Pending:
        """Start sending `send` to the next rank and receiving a tensor like it from the previous rank."""
        send = send.contiguous()
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next_global, group=self.group, tag=tag),
            dist.P2POp(dist.irecv, recv, self.prev_global, group=self.group, tag=tag),
        ]
        return _Pending(dist.batch_isend_irecv(ops), recv)


def exchange_blocks(
    sends: dict[int, torch.Tensor],
    recv_shapes: dict[int, tuple[int, ...]],
    *,
    group: dist.ProcessGroup,
    dtype: torch.dtype,
    device: torch.device,
    tag: int,
) -> dict[int, torch.Tensor]:
    """Send `sends[p]` to group rank p and receive a `recv_shapes[p]` tensor from each p, all at once.

    Peers with an empty tensor on both sides are skipped, so a rank only talks to the ranks it shares
    blocks with. Both dicts are keyed by rank within `group`; both sides must agree on the shapes.
    """
    ops = []
    received: dict[int, torch.Tensor] = {}
    for peer, tensor in sorted(sends.items()):
        if tensor.numel():
            ops.append(
                dist.P2POp(
                    dist.isend, tensor.contiguous(), dist.get_global_rank(group, peer), group=group, tag=tag
                )
            )
    for peer, shape in sorted(recv_shapes.items()):
        buf = torch.empty(shape, dtype=dtype, device=device)
        received[peer] = buf
        if buf.numel():
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group=group, tag=tag))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return received
