"""Training data for LongGen runs.

Public API (import from the modules; this package imports nothing, so `config.py` can use `blend.py`):
- `datasets.build_datasets(cfg, *, tokenizer, num_train_samples=None, num_valid_samples=None, cache_dir=None)`
  -> (train, valid-or-None): Megatron-Core GPTDataset blends for `cfg.data.blend`, else the packed text corpus.
- `preprocess.preprocess(...)` / `tools/preprocess_data.py`: text -> `PREFIX.bin/.idx` + `PREFIX.stats.json`.
- `length_sampling.LengthSampling`: per-source length up-sampling (Fu et al. 2024).
- `indexed.validate_indexed_prefix`: clear errors for missing, corrupt or truncated `.bin/.idx`.
- `tokenizers.load_tokenizer`: SentencePiece `.model`, HF tokenizer folder, or `builtin:tiny_sp`.
"""
