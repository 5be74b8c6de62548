"""Decode steps replayed from a CUDA graph: one launch per token instead of ~1,500 (7B shape).

Legend: B = batch rows, V = vocabulary.

An eager decode step of a 32-layer model issues about 45 small kernels per layer; at batch 1 the host
needs several milliseconds to launch them, as long as the GPU needs to stream the weights and the cache.
`CudaGraphDecoder` captures one step (`model(token, cache=cache, static_decode=True)`: embedding, every
layer's projections, RoPE, cache writes and attention, lm_head) once and replays it for every later
token. What makes the step replayable:
- its shapes do not depend on the lengths: full layers attend through the split-KV kernel, which reads the
  key count from the device (`decode_kernel.py`); sparse layers read their fixed-size buffers with a mask
  computed on the device from the slot positions;
- every per-step quantity (slots, positions, masks) is computed on the device from `cache.lengths_t`,
  which the step increments in place; only the host-side counters are advanced by `__call__`;
- the buffers never move: they are preallocated (`max_cache_len`), and a growth, a batch reordering or a
  reset (which bump `cache.version`) makes the decoder capture again.

The first call runs one real eager step on a side stream (it compiles the Triton kernels and sizes the
cuBLAS workspaces, which must not happen during capture), then captures; capturing runs no kernel, so the
host-side bookkeeping the capture performed is rolled back. Returned logits live in the graph's memory and
are overwritten by the next call: copy them to keep them.
"""

from __future__ import annotations

import torch

from megatron_longgen.inference.kv_cache import LongGenCache


class CudaGraphDecoder:
    """Greedy-or-sampling-agnostic decode step: `decoder(token_B1) -> logits [B, V]` (see the module docstring)."""

    def __init__(self, model, cache: LongGenCache):
        if cache.is_empty:
            raise ValueError("prefill the cache before decoding from a CUDA graph")
        if cache.lengths_t.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got {cache.lengths_t.device}")
        self.model = model
        self.cache = cache
        self.token = torch.zeros(len(cache.lengths), 1, dtype=torch.long, device=cache.lengths_t.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.version = -1

    def _step(self) -> torch.Tensor:
        out = self.model(self.token, cache=self.cache, use_cache=True, logits_to_keep=1, static_decode=True)
        return out.logits[:, -1]

    def __call__(self, token_B1: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if not cache.fits(max(cache.lengths) + 1):
            cache.ensure_capacity(max(cache.lengths) + 1)  # grows the buffers: capture again below
        self.token.copy_(token_B1.view(-1, 1))
        if self.graph is None or self.version != cache.version:
            return self._capture()
        self.graph.replay()
        cache.advance_host(1)
        return self.logits

    def _capture(self) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._step().clone()  # a real step: compiles kernels, allocates workspaces
        torch.cuda.current_stream().wait_stream(stream)
        host = self.cache.host_state()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.cache.restore_host_state(host)  # the capture executed nothing
        self.graph, self.version = graph, self.cache.version
        return logits
