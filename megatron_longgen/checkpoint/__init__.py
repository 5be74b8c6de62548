"""HF Llama <-> LongGen Megatron-Core checkpoints.

Public API (imported lazily: `import megatron_longgen.checkpoint` loads neither Megatron-Core nor
transformers):
- `load_model(mcore_dir, device="cpu")` -> `(model, config)`: our GPTModel at TP=PP=1 with the checkpoint
  loaded; `model(input_ids, position_ids, None)` -> logits [batch, seq, vocab] (padding stripped).
- `hf_to_mcore(...)`, `mcore_to_hf(...)`: the converters behind `tools/convert_*.py`.
- `format`: the checkpoint folder layout shared with the trainer (`longgen_config.json` + `model/`).
- `hf_model.LongGenLlamaForCausalLM`: the transformers class that runs an exported folder with the masks.
"""

from __future__ import annotations

_LAZY = {"load_model": "loading", "hf_to_mcore": "convert", "mcore_to_hf": "convert"}

__all__ = ["hf_to_mcore", "load_model", "mcore_to_hf"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"megatron_longgen.checkpoint.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'megatron_longgen.checkpoint' has no attribute {name!r}")
