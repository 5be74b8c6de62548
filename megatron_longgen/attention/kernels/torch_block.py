"""Block-sparse attention in plain PyTorch, with a flash-style recomputing backward.

Legend: B = batch, N = query heads, G = KV heads, r = N/G, S = query length, T = key length, H = head dim,
b = block size, nQB / nKB = query / key blocks, W = kept key blocks per query block (table width),
C = query blocks per chunk, K = W*b keys gathered per query block.

This is the portable path (CPU tests, the CPU demo, and the per-step kernel of context parallelism for
sparse layers). Its cost is proportional to the attended blocks, not to S^2:
- the forward walks over chunks of query blocks, gathers only their kept key blocks through the
  `kv_table` ([nQB, W] key-block indices, -1 padded), and keeps just `out` and the fp32 log-sum-exp;
- the backward recomputes the probabilities chunk by chunk (as FlashAttention does) and scatter-adds dK/dV
  into the key blocks, so no [S, T] tensor ever exists and activation memory is O(S*H).

Token-level causality comes from explicit positions (`q_positions`, `k_positions`): a key is visible when
its position is <= the query's. That makes the same function usable for a rank's shard of the sequence
under context parallelism, where local blocks carry global positions. All arithmetic is in fp32.
"""

from __future__ import annotations

import math

import torch

from megatron_longgen.compat.torch_cpu import warm_up_cpu_math

warm_up_cpu_math()  # before this module's first exp on CPU (compat/torch_cpu.py)

_NEG_INF = float("-inf")
_FAR_FUTURE = 2**62  # position given to padding keys: never visible


def _pad_to_blocks(x: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    pad = (-x.shape[dim]) % block_size
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _pad_positions(pos: torch.Tensor, block_size: int, fill: int) -> torch.Tensor:
    pad = (-pos.shape[0]) % block_size
    if pad == 0:
        return pos
    return torch.cat([pos, pos.new_full((pad,), fill)])


def _chunk_size(bytes_per_block: int, num_q_blocks: int, budget_bytes: int) -> int:
    return max(1, min(num_q_blocks, budget_bytes // max(bytes_per_block, 1)))


class _Inputs:
    """Blocked views and per-chunk gathers shared by forward and backward."""

    def __init__(self, q, k, v, kv_table, q_pos, k_pos, block_size):
        self.B, self.N, self.S, self.H = q.shape
        self.G = k.shape[1]
        self.r = self.N // self.G
        self.b = block_size
        qp = _pad_to_blocks(q.float(), 2, block_size)
        kp = _pad_to_blocks(k.float(), 2, block_size)
        vp = _pad_to_blocks(v.float(), 2, block_size)
        self.nQB = qp.shape[2] // block_size
        self.nKB = kp.shape[2] // block_size
        # [B, G, r, nQB, b, H] and [B, G, nKB, b, H]
        self.q = qp.view(self.B, self.G, self.r, self.nQB, block_size, self.H)
        self.k = kp.view(self.B, self.G, self.nKB, block_size, self.H)
        self.v = vp.view(self.B, self.G, self.nKB, block_size, self.H)
        # Padding queries get position -1 (see nothing), padding keys the far future (seen by nobody).
        self.q_pos = _pad_positions(q_pos, block_size, -1).view(self.nQB, block_size)
        self.k_pos = _pad_positions(k_pos, block_size, _FAR_FUTURE).view(self.nKB, block_size)
        self.table = kv_table

    def gather(self, c0: int, c1: int):
        tbl = self.table[c0:c1]  # [C, W]
        valid = tbl >= 0
        idx = tbl.clamp(min=0)
        C, W = tbl.shape
        kg = self.k[:, :, idx].reshape(self.B, self.G, C, W * self.b, self.H)
        vg = self.v[:, :, idx].reshape(self.B, self.G, C, W * self.b, self.H)
        kpos = self.k_pos[idx].reshape(C, W * self.b)
        key_ok = valid.repeat_interleave(self.b, dim=1)  # [C, K]
        qpos = self.q_pos[c0:c1]  # [C, b]
        visible = key_ok[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])  # [C, b, K]
        return idx, kg, vg, visible


def _scores(qc, kg, visible, scale):
    # qc [B, G, r, C, b, H], kg [B, G, C, K, H] -> [B, G, r, C, b, K]
    s = torch.einsum("bgrcqh,bgckh->bgrcqk", qc, kg) * scale
    return s.masked_fill(~visible[None, None, None], _NEG_INF)


def _safe_lse(s: torch.Tensor) -> torch.Tensor:
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return (s - m).exp().sum(dim=-1).log() + m.squeeze(-1)


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # Rows with no visible key have lse = -inf; their probabilities must be 0, not NaN.
    finite = torch.isfinite(lse)
    p = (s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1)).exp()
    return p * finite.unsqueeze(-1)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_table, q_pos, k_pos, scale, block_size, budget_bytes):
        x = _Inputs(q, k, v, kv_table, q_pos, k_pos, block_size)
        out = torch.empty(x.B, x.G, x.r, x.nQB, block_size, x.H, dtype=torch.float32, device=q.device)
        lse = torch.empty(x.B, x.G, x.r, x.nQB, block_size, dtype=torch.float32, device=q.device)
        width = kv_table.shape[1]
        step = _chunk_size(4 * x.B * x.N * block_size * width * block_size, x.nQB, budget_bytes)
        for c0 in range(0, x.nQB, step):
            c1 = min(c0 + step, x.nQB)
            _, kg, vg, visible = x.gather(c0, c1)
            s = _scores(x.q[:, :, :, c0:c1], kg, visible, scale)
            lse_c = _safe_lse(s)
            p = _probs(s, lse_c)
            out[:, :, :, c0:c1] = torch.einsum("bgrcqk,bgckh->bgrcqh", p, vg)
            lse[:, :, :, c0:c1] = lse_c
        out = out.reshape(x.B, x.N, x.nQB * block_size, x.H)[:, :, : x.S]
        lse = lse.reshape(x.B, x.N, x.nQB * block_size)[:, :, : x.S]
        ctx.save_for_backward(q, k, v, kv_table, q_pos, k_pos, out, lse)
        ctx.scale, ctx.block_size, ctx.budget_bytes, ctx.step = scale, block_size, budget_bytes, step
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, kv_table, q_pos, k_pos, out, lse = ctx.saved_tensors
        b, scale, step = ctx.block_size, ctx.scale, ctx.step
        x = _Inputs(q, k, v, kv_table, q_pos, k_pos, b)
        blocked = (x.B, x.G, x.r, x.nQB, b)
        d_out = _pad_to_blocks(d_out.float() if d_out is not None else torch.zeros_like(out), 2, b)
        d_out = d_out.view(*blocked, x.H)
        out_b = _pad_to_blocks(out, 2, b).view(*blocked, x.H)
        lse_b = _pad_to_blocks(lse, 2, b).view(*blocked)
        d_lse_b = _pad_to_blocks(d_lse.float(), 2, b).view(*blocked) if d_lse is not None else None
        delta = (d_out * out_b).sum(dim=-1)  # D_i = sum_h dO*O: the softmax-Jacobian row term
        dq = torch.zeros_like(x.q)
        dk = torch.zeros_like(x.k)
        dv = torch.zeros_like(x.v)
        for c0 in range(0, x.nQB, step):
            c1 = min(c0 + step, x.nQB)
            idx, kg, vg, visible = x.gather(c0, c1)
            qc = x.q[:, :, :, c0:c1]
            lse_c = lse_b[:, :, :, c0:c1]
            p = _probs(_scores(qc, kg, visible, scale), lse_c)
            do_c = d_out[:, :, :, c0:c1]
            dp = torch.einsum("bgrcqh,bgckh->bgrcqk", do_c, vg)
            row = delta[:, :, :, c0:c1]
            if d_lse_b is not None:
                # d lse / d s_j = p_j, so an incoming lse gradient adds to every score's gradient.
                row = row - torch.nan_to_num(d_lse_b[:, :, :, c0:c1], nan=0.0)
            ds = p * (dp - row.unsqueeze(-1))
            dq[:, :, :, c0:c1] = torch.einsum("bgrcqk,bgckh->bgrcqh", ds, kg) * scale
            dkg = torch.einsum("bgrcqk,bgrcqh->bgckh", ds, qc) * scale
            dvg = torch.einsum("bgrcqk,bgrcqh->bgckh", p, do_c)
            C, W = idx.shape
            flat = idx.reshape(-1)
            # Padding entries point at block 0 but carry p = 0, so they add exact zeros.
            dk.index_add_(2, flat, dkg.reshape(x.B, x.G, C * W, b, x.H))
            dv.index_add_(2, flat, dvg.reshape(x.B, x.G, C * W, b, x.H))
        dq = dq.reshape(x.B, x.N, x.nQB * b, x.H)[:, :, : x.S].to(q.dtype)
        dk = dk.reshape(x.B, x.G, x.nKB * b, x.H)[:, :, : k.shape[2]].to(k.dtype)
        dv = dv.reshape(x.B, x.G, x.nKB * b, x.H)[:, :, : v.shape[2]].to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def block_sparse_attention_torch(
    q_BNSH: torch.Tensor,
    k_BGTH: torch.Tensor,
    v_BGTH: torch.Tensor,
    *,
    kv_table: torch.Tensor,
    block_size: int,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    chunk_budget_bytes: int = 256 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query block over the key blocks its `kv_table` row lists.

    Args:
        q_BNSH: queries; query block i is rows [i*b, (i+1)*b) (the last one may be short).
        k_BGTH, v_BGTH: keys and values, blocked the same way; G must divide N (GQA).
        kv_table: int64 [ceil(S/b), W], local key-block indices per query block, -1 = none.
        block_size: b.
        q_positions, k_positions: int64 [S] / [T] positions for the causal rule (default arange).
        softmax_scale: defaults to 1/sqrt(H).
        chunk_budget_bytes: bound on the fp32 score tile of one chunk of query blocks.

    Returns:
        out_BNSH (input dtype) and lse_BNS (fp32; -inf for a row that sees no key). Differentiable with
        respect to q, k, v, through both outputs.
    """
    S, T = q_BNSH.shape[2], k_BGTH.shape[2]
    if q_BNSH.shape[1] % k_BGTH.shape[1]:
        raise ValueError(f"query heads {q_BNSH.shape[1]} must be a multiple of kv heads {k_BGTH.shape[1]}")
    n_qb = -(-S // block_size)
    if kv_table.shape[0] != n_qb:
        raise ValueError(f"kv_table has {kv_table.shape[0]} rows but the {S} queries form {n_qb} blocks")
    device = q_BNSH.device
    q_pos = torch.arange(S, device=device) if q_positions is None else q_positions.to(device)
    k_pos = torch.arange(T, device=device) if k_positions is None else k_positions.to(device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q_BNSH.shape[-1])
    return _BlockSparseAttention.apply(
        q_BNSH, k_BGTH, v_BGTH, kv_table.to(device), q_pos, k_pos, scale, block_size, chunk_budget_bytes
    )
