"""`LongGenCache`: a transformers `Cache` that keeps, per layer, exactly the keys LongGen's training mask
lets a future query see.

Legend: B = batch rows, G = KV heads, C = slots of a layer, H = head dim, q = new tokens of a forward.

Design:
- One `LongGenCacheLayer` per model layer holds `keys`/`values` [B, G, C, H] in the layer's dtype;
  layers of the same kind (`kv_layout.FullLayout`, `SinkWindowLayout`, `BlockStridedLayout`) share a
  `_Kind`: the slot capacity and, for sparse kinds, the position of every slot ([B, C] int64, -1 = empty).
  F layers keep every token; S layers keep their sink/strided blocks and a ring of the latest blocks
  (see `kv_layout.py` for the slots and why the layouts are exact).
- Positions are document positions: row r's first real token is position 0, whatever its left padding.
  The cache counts them itself (`lengths`, host, and `lengths_t`, device), so a decode step needs no host
  sync: slots and masks are computed on the device from `lengths_t`.
- Buffers are preallocated (`max_cache_len`, which `generate()` passes as prompt + max_new_tokens) and
  written in place: no `torch.cat` per decode step. When a sequence outgrows them they grow by at least
  12.5% (one layer at a time, so the transient is one layer's buffer).
- The model drives the cache through `StepPlan` (see `step_plan.py`) and the write/read methods below;
  transformers' own `update()` cannot use a ring without positions, so it raises with a pointer here.
- Bytes are reported per layer kind (`nbytes_by_kind`), allocated (what the device holds) and used.

Padding: left padding (transformers' convention for generation) and right padding are both exact: each
row's real tokens must be one contiguous span of the first forward; tokens of later forwards are real.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from megatron_longgen.inference.kv_layout import FullLayout, KVLayout

_MIN_GROWTH = 256  # slots added at least when a buffer grows (and reserved after a prompt by default)


@dataclass(eq=False)
class _Kind:
    """State shared by the layers of one layout: capacity and slot positions (sparse layouts only)."""

    layout: KVLayout
    capacity: int = 0
    positions: torch.Tensor | None = None  # [B, C] int64, -1 = empty; None for FullLayout
    layers: list[LongGenCacheLayer] = field(default_factory=list)

    @property
    def is_full(self) -> bool:
        return isinstance(self.layout, FullLayout)


class LongGenCacheLayer(CacheLayerMixin):
    """One layer's K/V buffers. Filled by `LongGenCache`; see the module docstring."""

    is_compileable = False
    is_croppable = False

    def __init__(self, owner: LongGenCache, kind: _Kind):
        super().__init__()
        self._owner = owner
        self.kind = kind
        self.is_sliding = not kind.is_full

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "LongGenCache is written by LongGenLlamaForCausalLM's attention (it needs document positions and "
            "each layer's keep rule); load the model with megatron_longgen.checkpoint.hf_model"
        )

    def get_seq_length(self) -> int:
        return self._owner.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length before transformers 5.16
        return -1

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def allocate(self, *, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        shape = (batch, heads, self.kind.capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.is_initialized = True

    def grow(self, capacity: int) -> None:
        if self.keys is None:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : old.shape[2]] = old  # layouts are prefix-stable (kv_layout.py)
            setattr(self, name, new)


class LongGenCache(Cache):
    """Reduced KV cache for `LongGenLlamaForCausalLM` (see the module docstring).

    Args:
        layouts: one `kv_layout` layout per model layer (the model's `kv_layouts()`).
        max_cache_len: tokens per row to reserve room for (prompt + new tokens); None reserves the
            prompt + 256 and grows on demand.
    """

    def __init__(self, *, layouts: Sequence[KVLayout], max_cache_len: int | None = None):
        self._kinds: dict[KVLayout, _Kind] = {}
        layers = []
        for layout in layouts:
            kind = self._kinds.setdefault(layout, _Kind(layout))
            layer = LongGenCacheLayer(self, kind)
            kind.layers.append(layer)
            layers.append(layer)
        super().__init__(layers=layers)
        self.reserve_len = max_cache_len
        self.version = 0  # bumped whenever a buffer is replaced (captured CUDA graphs hold their addresses)
        self._clear_state()

    def _clear_state(self) -> None:
        self.version = getattr(self, "version", 0) + 1
        self.graph_decoder = None  # a CudaGraphDecoder bound to these buffers, if any
        self.seen_tokens = 0  # columns of input consumed (padding included): what transformers calls length
        self.lengths: list[int] = []  # real tokens per row (host)
        self.lengths_t: torch.Tensor | None = None  # same, on the device
        for kind in self._kinds.values():
            kind.capacity, kind.positions = 0, None
            for layer in kind.layers:
                layer.keys = layer.values = None
                layer.is_initialized = False

    # ----- what transformers calls ---------------------------------------------------------------
    def reset(self) -> None:
        self._clear_state()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("LongGenCache cannot be cropped: sparse layers have evicted old keys")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.lengths_t is None:
            return
        idx = indices.to(self.lengths_t.device)
        self.version += 1
        self.lengths = [self.lengths[i] for i in indices.tolist()]
        self.lengths_t = self.lengths_t.index_select(0, idx)
        for kind in self._kinds.values():
            if kind.positions is not None:
                kind.positions = kind.positions.index_select(0, idx)
            for layer in kind.layers:
                if layer.keys is not None:
                    layer.keys = layer.keys.index_select(0, idx)
                    layer.values = layer.values.index_select(0, idx)
        for layer in self.layers:
            layer.batch_size = len(self.lengths)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.lengths_t is not None:
            rows = torch.arange(len(self.lengths)).repeat_interleave(repeats)
            self.batch_select_indices(rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    # ----- sizes ------------------------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return self.lengths_t is None

    def nbytes_by_kind(self) -> dict[str, int]:
        """Allocated K/V bytes summed per layer kind (`full`, `sink_window`, `block_strided`)."""
        out: dict[str, int] = {}
        for kind in self._kinds.values():
            out[kind.layout.name] = out.get(kind.layout.name, 0) + sum(layer.nbytes for layer in kind.layers)
        return out

    def nbytes(self) -> int:
        """Allocated K/V bytes of all layers."""
        return sum(self.nbytes_by_kind().values())

    def used_slots(self) -> dict[str, list[int]]:
        """Per layer kind, per row: slots holding a key some future query may still see."""
        out = {}
        for kind in self._kinds.values():
            out[kind.layout.name] = [len(kind.layout.kept_positions(n)) for n in self.lengths]
        return out

    # ----- writes (driven by the model, see step_plan.py) ---------------------------------------------
    def kind_of(self, layer_idx: int) -> _Kind:
        return self.layers[layer_idx].kind

    def ensure_capacity(self, max_len: int) -> None:
        """Make every kind hold `max_len` tokens per row, growing buffers that are too small."""
        for kind in self._kinds.values():
            need = kind.layout.capacity(max_len)
            if need <= kind.capacity:
                continue
            if kind.capacity == 0:
                kind.capacity = need
                continue
            target = kind.layout.capacity(max_len + max(_MIN_GROWTH, max_len // 8))
            self.version += 1
            for layer in kind.layers:
                layer.grow(target)
            if kind.positions is not None:
                grown = kind.positions.new_full((kind.positions.shape[0], target), -1)
                grown[:, : kind.capacity] = kind.positions
                kind.positions = grown
            kind.capacity = target

    def start(self, *, lengths: list[int], max_len_hint: int, device: torch.device) -> None:
        """First forward: rows hold `lengths` real tokens; allocate for at least `max_len_hint` per row."""
        self.lengths = list(lengths)
        self.lengths_t = torch.tensor(lengths, dtype=torch.int64).to(device)
        reserve = self.reserve_len if self.reserve_len is not None else max_len_hint + _MIN_GROWTH
        self.ensure_capacity(max(reserve, max_len_hint, 1))
        for kind in self._kinds.values():
            if not kind.is_full:
                kind.positions = torch.full(
                    (len(lengths), kind.capacity), -1, dtype=torch.int64, device=device
                )
        for layer in self.layers:
            layer.batch_size = len(lengths)
        self.version += 1

    def advance(self, num_new: int) -> None:
        """After a forward that added `num_new` tokens to every row (after the first forward)."""
        self.lengths_t += num_new  # in place: a captured graph keeps reading this tensor
        self.advance_host(num_new)

    def advance_host(self, num_new: int) -> None:
        """The host-side counters of `advance` (a CUDA graph replay advances `lengths_t` itself)."""
        self.lengths = [n + num_new for n in self.lengths]
        self.seen_tokens += num_new

    def host_state(self) -> tuple[list[int], int]:
        return list(self.lengths), self.seen_tokens

    def restore_host_state(self, state: tuple[list[int], int]) -> None:
        self.lengths, self.seen_tokens = list(state[0]), state[1]

    def fits(self, max_len: int) -> bool:
        """Whether every kind's buffers already hold `max_len` tokens per row (no growth needed)."""
        return all(kind.layout.capacity(max_len) <= kind.capacity for kind in self._kinds.values())

    def layer_buffers(self, layer_idx: int, *, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V buffers of a layer, allocated on first use with `like`'s heads, dim, dtype and device."""
        layer = self.layers[layer_idx]
        if layer.keys is None:
            batch, heads, _, head_dim = like.shape
            layer.allocate(batch=batch, heads=heads, head_dim=head_dim, dtype=like.dtype, device=like.device)
        return layer.keys, layer.values
