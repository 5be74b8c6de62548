"""FlexAttention for a rank's sparse layer under CP: local queries over [local | fetched] keys.

Legend: B = batch, N = query heads, G = KV heads, H = head dim, b = sparse block size, L = local query
blocks, KB = key blocks after the exchange (local + fetched, padded), TM = Flex tile (128), nQT / nKT =
query / key tiles, S = local queries, T = keys (padded to a multiple of TM).

The kernels in `attention/kernels/` take a whole causal sequence and a pattern; after the KV-reduced
exchange a rank instead has its zig-zag shard of queries and a key tensor whose blocks are not contiguous
in position. This module builds a Flex `BlockMask` straight from the exchange plan's per-query-block key
table (`SparseExchangePlan.kv_table`, [L, W]) with `BlockMask.from_kv_blocks`, never evaluating the mask
function on all S x T pairs:

- a TM x TM tile is *listed* when any of its (TM/b)^2 sparse blocks is kept;
- it is *full* (mask function skipped) when all of them are kept and every key position in it is below
  every query position in it; otherwise Flex evaluates the token-level mask function
  `kept[q // b, kv // b] & (k_pos[kv] <= q_pos[q])` (global positions: causality across ranks).

The key tensor is padded to whole tiles with keys that no query keeps. On CUDA `flex_attention` runs
compiled (forward and backward); on CPU eagerly (tests, small shapes; [S, T] scores). The returned lse is
not differentiable (ring-free sparse layers only need `out`).
"""

from __future__ import annotations

import functools
import math

import torch

from megatron_longgen.context_parallel.sparse_exchange import SparseExchangePlan

FLEX_TILE = 128


def _flex():
    from torch.nn.attention import flex_attention as flex_mod

    return flex_mod


@functools.cache
def _compiled_flex():
    return torch.compile(_flex().flex_attention, dynamic=False)


def flex_unavailable_reason(
    *, plan: SparseExchangePlan, device: torch.device, tile: int = FLEX_TILE
) -> str | None:
    """None when `flex_cp_attention` can run this plan on `device`, else a one-line reason."""
    local = plan.q_positions.numel()
    if tile % plan.block_size or local % tile:
        return f"Flex tile {tile} needs block_size {plan.block_size} | {tile} and local length {local} % {tile} == 0"
    if device.type != "cuda":
        return f"compiled FlexAttention needs CUDA, got {device.type}"
    try:
        _flex()
    except ImportError as exc:
        return f"torch.nn.attention.flex_attention is missing ({exc})"
    return None


class _MaskCache:
    """Block masks per (plan, device); plans are cached per layer shape, so this stays small."""

    def __init__(self):
        self._masks: dict[tuple, tuple] = {}

    def get(self, plan: SparseExchangePlan, device: torch.device, tile: int):
        key = (id(plan), str(device), tile)
        if key not in self._masks:
            self._masks[key] = (plan, *build_flex_block_mask(plan, device=device, tile=tile))
        return self._masks[key][1:]


_MASKS = _MaskCache()


def build_flex_block_mask(plan: SparseExchangePlan, *, device: torch.device | str, tile: int = FLEX_TILE):
    """(BlockMask, padded key length T) for `plan` with tile x tile Flex tiles."""
    flex_mod = _flex()
    b = plan.block_size
    sub = tile // b
    table = plan.kv_table.to(device)  # [L, W]
    n_q_blocks = table.shape[0]
    n_keys = plan.k_positions.numel()
    n_kt = -(-n_keys // tile)
    n_kb = n_kt * sub
    kept = torch.zeros(n_q_blocks, n_kb + 1, dtype=torch.bool, device=device)
    rows = torch.arange(n_q_blocks, device=device)[:, None].expand_as(table)
    kept[rows, torch.where(table >= 0, table, n_kb)] = True  # -1 padding lands in a spare column
    kept = kept[:, :n_kb].contiguous()
    q_pos = plan.q_positions.to(device)
    far = torch.iinfo(torch.int64).max
    k_pos = torch.full((n_kt * tile,), far, dtype=torch.int64, device=device)
    k_pos[:n_keys] = plan.k_positions.to(device)

    n_qt = n_q_blocks // sub
    tiles = kept.view(n_qt, sub, n_kt, sub)
    listed = tiles.any(dim=3).any(dim=1)
    all_kept = tiles.all(dim=3).all(dim=1)
    q_min = q_pos.view(n_qt, tile).amin(dim=1)
    k_max = k_pos.view(n_kt, tile).amax(dim=1)
    full = all_kept & (k_max[None, :] < q_min[:, None])
    partial = listed & ~full

    def ordered(sel: torch.Tensor):
        cols = torch.arange(n_kt, device=device).expand_as(sel)
        idx = torch.where(sel, cols, cols + n_kt).sort(dim=1).values
        idx = torch.where(idx < n_kt, idx, idx - n_kt)  # unlisted columns trail; Flex ignores them
        return sel.sum(dim=1).to(torch.int32)[None, None], idx.to(torch.int32)[None, None].contiguous()

    def mask_mod(batch, head, q_idx, kv_idx):
        return kept[q_idx // b, kv_idx // b] & (k_pos[kv_idx] <= q_pos[q_idx])

    mask_mod.__name__ = f"cp_sparse_b{b}"
    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    mask = flex_mod.BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=tile,
        mask_mod=mask_mod,
        seq_lengths=(q_pos.numel(), n_kt * tile),
    )
    return mask, n_kt * tile


def flex_cp_attention(
    q_BNSH: torch.Tensor,
    k_BGTH: torch.Tensor,
    v_BGTH: torch.Tensor,
    *,
    plan: SparseExchangePlan,
    softmax_scale: float | None = None,
    compiled: bool | None = None,
    tile: int = FLEX_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the local queries over [local | fetched] keys laid out as `plan` says.

    Returns out_BNSH (input dtype, differentiable w.r.t. q, k, v) and lse_BNS (fp32, not differentiable).
    """
    flex_mod = _flex()
    mask, padded = _MASKS.get(plan, q_BNSH.device, tile)
    pad = padded - k_BGTH.shape[2]
    if pad:
        zeros = k_BGTH.new_zeros(*k_BGTH.shape[:2], pad, k_BGTH.shape[3])
        k_BGTH, v_BGTH = torch.cat([k_BGTH, zeros], dim=2), torch.cat([v_BGTH, zeros], dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q_BNSH.shape[-1])
    use_compiled = q_BNSH.is_cuda if compiled is None else compiled
    fn = _compiled_flex() if use_compiled else flex_mod.flex_attention
    out, lse = fn(
        q_BNSH,
        k_BGTH,
        v_BGTH,
        block_mask=mask,
        scale=scale,
        enable_gqa=k_BGTH.shape[1] != q_BNSH.shape[1],
        return_lse=True,
    )
    return out, lse.detach().float()
