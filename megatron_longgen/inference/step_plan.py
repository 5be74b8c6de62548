"""What one forward does with the cache: planned once per forward, used by every layer.

Legend: B = batch rows, T = tokens of this forward (padding included), G = KV heads, C = slots, H = head dim.

Three modes:
- `prefill`: no cache, or an empty one. Attention runs over this forward's tokens only (sparse kernel or
  causal SDPA, one call per row when rows are padded); each layer then copies the keys its kind keeps
  into the cache (host-computed indices, once per kind).
- `decode`: one new token per row over a filled cache. Slots and masks come from `cache.lengths_t` on the
  device (no host sync). The new key is written first: the slot it overwrites held a key of a block the
  new query no longer sees (kv_layout.py), so write-then-attend is exact.
- `extend`: several new tokens over a filled cache (chunked prefill, speculative verification). Sparse
  layers attend over [cache, new keys] with a [B, 1, T, C + T] mask and write afterwards (the chunk's
  later tokens may evict keys its earlier queries still need); full layers write first and attend with a
  lower-right causal bias (no mask tensor).

Only the first forward may contain padding: each row's real tokens form one contiguous span (left or
right padding); positions count real tokens only. Later forwards' tokens are all real (what `generate()`
passes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_longgen.inference.kv_cache import LongGenCache
from megatron_longgen.inference.kv_layout import KVLayout, keep_mask


@dataclass
class KindStep:
    """Per layer kind: what every layer of that kind reads and writes in this forward."""

    key_len: int = 0
    """decode: read buffer slots [0, key_len)."""
    slots_t: torch.Tensor | None = None
    """decode: [B] slot of each row's new token (device)."""
    mask: torch.Tensor | None = None
    """decode: [B, 1, 1, key_len] booleans, or None when every slot < key_len is visible to every row."""
    kv_len_t: torch.Tensor | None = None
    """static decode, full kind: [B] keys per row (device); the split-KV kernel reads slots [0, kv_len)."""
    writes: list[tuple[slice, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """prefill / extend, sparse kinds: (rows, indices of the kept tokens in this forward, their slots)."""
    spans: list[tuple[slice, int, int, int]] = field(default_factory=list)
    """prefill / extend, full kind: (rows, first token in this forward, first slot, count)."""
    new_positions: list[tuple[slice, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """extend, sparse kinds: (rows, slots, positions) recorded once every layer has attended."""


@dataclass
class StepPlan:
    mode: str
    q_len: int
    positions: torch.Tensor
    """[B, T] document positions (device), -1 at padding."""
    spans: list[tuple[int, int]] | None
    """prefill: per row (start, length) of its real tokens; None when no row is padded."""
    lengths_before: list[int]
    kinds: dict[KVLayout, KindStep]


def padding_spans(attention_mask: torch.Tensor | None, *, batch: int, q_len: int):
    """(spans or None, lengths) of the real tokens of a first forward; ValueError for holes or empty rows."""
    if attention_mask is None:
        return None, [q_len] * batch
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be 2-D [batch, tokens] (1 = real token), got shape {tuple(attention_mask.shape)}"
        )
    real = attention_mask[:, -q_len:].to(device="cpu", dtype=torch.bool)  # one host sync per first forward
    if bool(real.all()):
        return None, [q_len] * batch
    lengths = real.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"attention_mask has a row without any real token: lengths {lengths.tolist()}")
    first = real.to(torch.int8).argmax(dim=1)
    cols = torch.arange(q_len)
    contiguous = (cols >= first[:, None]) & (cols < (first + lengths)[:, None])
    if not torch.equal(contiguous, real):
        raise ValueError(
            "each row's real tokens (attention_mask == 1) must be one contiguous span: pad on the left "
            "(tokenizer.padding_side = 'left', as for generate()) or on the right"
        )
    return [(int(s), int(n)) for s, n in zip(first, lengths)], lengths.tolist()


def plan_forward(
    cache: LongGenCache | None,
    *,
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    device: torch.device,
    static_decode: bool = False,
) -> StepPlan:
    """Plan a forward of `q_len` tokens for `batch` rows (see the module docstring). `static_decode`: a
    decode step whose shapes do not depend on the lengths (full layers read their whole buffer through
    the split-KV kernel), so a CUDA graph can replay it (`cuda_graphs.py`)."""
    if cache is None or cache.is_empty:
        return _plan_prefill(cache, attention_mask=attention_mask, batch=batch, q_len=q_len, device=device)
    if batch != len(cache.lengths):
        raise ValueError(f"the cache holds {len(cache.lengths)} rows but this forward has {batch}")
    if q_len == 1:
        return _plan_decode(cache, device=device, static=static_decode)
    return _plan_extend(cache, q_len=q_len, device=device)


def _row_groups(spans, *, batch: int, q_len: int) -> list[tuple[slice, int, int]]:
    """(rows, first token, count): unpadded rows are handled together, padded rows one by one."""
    if spans is None:
        return [(slice(0, batch), 0, q_len)]
    return [(slice(row, row + 1), start, length) for row, (start, length) in enumerate(spans)]


def _plan_prefill(cache, *, attention_mask, batch, q_len, device) -> StepPlan:
    spans, lengths = padding_spans(attention_mask, batch=batch, q_len=q_len)
    groups = _row_groups(spans, batch=batch, q_len=q_len)
    positions = torch.full((batch, q_len), -1, dtype=torch.int64)
    for rows, start, length in groups:
        positions[rows, start : start + length] = torch.arange(length)
    kinds: dict[KVLayout, KindStep] = {}
    if cache is not None:
        cache.start(lengths=lengths, max_len_hint=max(lengths), device=device)
        for layout, kind in cache._kinds.items():
            step = kinds[layout] = KindStep()
            for rows, start, length in groups:
                if kind.is_full:
                    step.spans.append((rows, start, 0, length))
                    continue
                kept = layout.kept_positions(length)
                slots = layout.slot_of(kept).to(device)
                kept = kept.to(device)
                step.writes.append((rows, kept + start, slots))
                kind.positions[rows, slots] = kept
    return StepPlan("prefill", q_len, positions.to(device), spans, list(lengths), kinds)


def _plan_decode(cache: LongGenCache, *, device, static: bool = False) -> StepPlan:
    lengths = cache.lengths
    cache.ensure_capacity(max(lengths) + 1)
    pos_t = cache.lengths_t  # position of each row's new token
    kinds: dict[KVLayout, KindStep] = {}
    for layout, kind in cache._kinds.items():
        if kind.is_full and static:
            kinds[layout] = KindStep(key_len=kind.capacity, slots_t=pos_t, kv_len_t=pos_t + 1)
            continue
        if kind.is_full:
            key_len = max(lengths) + 1
            mask = None
            if min(lengths) != max(lengths):
                slots = torch.arange(key_len, device=device)
                mask = (slots[None, :] <= pos_t[:, None])[:, None, None, :]
            kinds[layout] = KindStep(key_len=key_len, slots_t=pos_t, mask=mask)
            continue
        slots_t = layout.slot_of(pos_t)
        kind.positions.scatter_(1, slots_t[:, None], pos_t[:, None])
        mask = keep_mask(layout.pattern, q_pos=pos_t[:, None], k_pos=kind.positions)
        kinds[layout] = KindStep(key_len=kind.capacity, slots_t=slots_t, mask=mask[:, None, None, :])
    return StepPlan("decode", 1, pos_t[:, None], None, list(lengths), kinds)


def _plan_extend(cache: LongGenCache, *, q_len: int, device) -> StepPlan:
    lengths = cache.lengths
    cache.ensure_capacity(max(lengths) + q_len)
    positions = cache.lengths_t[:, None] + torch.arange(q_len, device=device)[None, :]
    if min(lengths) == max(lengths):
        groups = [(slice(0, len(lengths)), lengths[0])]
    else:
        groups = [(slice(row, row + 1), length) for row, length in enumerate(lengths)]
    kinds: dict[KVLayout, KindStep] = {}
    for layout, kind in cache._kinds.items():
        step = kinds[layout] = KindStep()
        for rows, length in groups:
            if kind.is_full:
                step.spans.append((rows, 0, length, q_len))
                continue
            kept = layout.kept_positions(length + q_len)
            kept = kept[kept >= length]
            slots = layout.slot_of(kept).to(device)
            kept = kept.to(device)
            step.writes.append((rows, kept - length, slots))
            step.new_positions.append((rows, slots, kept))
    return StepPlan("extend", q_len, positions, None, list(lengths), kinds)


def finish_forward(cache: LongGenCache | None, plan: StepPlan) -> None:
    """Advance the cache's counters once every layer has run."""
    if cache is None:
        return
    if plan.mode == "prefill":
        cache.seen_tokens = plan.q_len
        return
    for layout, step in plan.kinds.items():
        for rows, slots, kept in step.new_positions:
            cache._kinds[layout].positions[rows, slots] = kept
    cache.advance(plan.q_len)


# ----- per-layer writes -------------------------------------------------------------------------------
def store_tokens(cache: LongGenCache, layer_idx: int, k_BGTH, v_BGTH, plan: StepPlan) -> None:
    """prefill / extend: copy the kept tokens of this forward into the layer's buffers."""
    keys, values = cache.layer_buffers(layer_idx, like=k_BGTH)
    step = plan.kinds[cache.kind_of(layer_idx).layout]
    for rows, start, first_slot, count in step.spans:
        keys[rows, :, first_slot : first_slot + count] = k_BGTH[rows, :, start : start + count]
        values[rows, :, first_slot : first_slot + count] = v_BGTH[rows, :, start : start + count]
    for rows, src_idx, slots in step.writes:
        keys[rows, :, slots] = k_BGTH[rows].index_select(2, src_idx)
        values[rows, :, slots] = v_BGTH[rows].index_select(2, src_idx)


def write_decode(cache: LongGenCache, layer_idx: int, k_BG1H, v_BG1H, plan: StepPlan):
    """decode: write each row's new key/value at its slot; return the keys, values and mask to attend to."""
    keys, values = cache.layer_buffers(layer_idx, like=k_BG1H)
    step = plan.kinds[cache.kind_of(layer_idx).layout]
    index = step.slots_t.view(-1, 1, 1, 1).expand_as(k_BG1H)
    keys.scatter_(2, index, k_BG1H)
    values.scatter_(2, index, v_BG1H)
    return keys[:, :, : step.key_len], values[:, :, : step.key_len], step.mask
