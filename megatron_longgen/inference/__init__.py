"""Reduced-KV inference for LongGen models (never imported by training code).

Public API (imported lazily: `import megatron_longgen.inference` loads neither transformers nor the cache):
- `LongGenCache`: the transformers `Cache` that keeps, per layer, exactly the keys LongGen's training mask
  lets a future query see (`kv_cache.py`; slot layouts in `kv_layout.py`).
- `load_model(model_dir, ...)`: an exported folder (or plain HF Llama folder) as a
  `LongGenLlamaForCausalLM` with a KV policy, device and dtype (`loading.py`).
- `KV_POLICIES`: `model`, `full`, `sink_window`, `block_strided`.
- `CudaGraphDecoder`: decode steps replayed from a CUDA graph (`cuda_graphs.py`; `split_kv_decode` in
  `decode_kernel.py` is the Triton kernel it relies on).
"""

from __future__ import annotations

_LAZY = {
    "LongGenCache": "kv_cache",
    "load_model": "loading",
    "load_tokenizer_for": "loading",
    "KV_POLICIES": "kv_layout",
    "CudaGraphDecoder": "cuda_graphs",
}

__all__ = ["KV_POLICIES", "CudaGraphDecoder", "LongGenCache", "load_model", "load_tokenizer_for"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"megatron_longgen.inference.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'megatron_longgen.inference' has no attribute {name!r}")
