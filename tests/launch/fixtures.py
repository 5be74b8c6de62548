"""Production-input fixtures for launch tests: an HF tokenizer of any vocabulary size, Megatron indexed
datasets (small real ones, and huge sparse ones whose `.bin` takes no disk space), a LongGen checkpoint
folder with only its metadata (the validator reads nothing else)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from megatron_longgen.config import LongGenConfig


def hf_tokenizer(folder: Path, *, vocab_size: int) -> str:
    """A word-level HF tokenizer folder with exactly `vocab_size` ids (<unk>, <s>, </s>, w3, w4, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return str(folder)


def indexed_dataset(prefix: Path, *, doc_lengths: list[int], vocab_size: int = 1024) -> str:
    """A real Megatron indexed dataset (written through Megatron-Core's builder) with these documents."""
    from megatron_longgen.data.indexed import AtomicIndexedWriter

    rng = np.random.default_rng(0)
    with AtomicIndexedWriter(str(prefix), dtype=np.uint16) as writer:
        for n in doc_lengths:
            writer.add_document(rng.integers(0, vocab_size, n, dtype=np.uint16))
        writer.commit()
    return str(prefix)


def sparse_indexed_dataset(prefix: Path, *, doc_lengths: list[int]) -> str:
    """A Megatron index (format of `data/indexed.py`'s docstring) for billions of uint16 tokens, with a sparse
    `.bin` of the right size: the validator reads lengths and file sizes, never the tokens."""
    n = len(doc_lengths)
    lengths = np.asarray(doc_lengths, dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 2)]).astype(np.int64)
    docs = np.arange(n + 1, dtype=np.int64)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([8]) + struct.pack("<QQ", n, n + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + docs.tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)
    return str(prefix)


def checkpoint_metadata(folder: Path, cfg: LongGenConfig) -> str:
    """A checkpoint folder as tools/convert_hf_to_mcore.py leaves it, minus the tensors."""
    from megatron_longgen.checkpoint.format import save_config

    (folder / "model").mkdir(parents=True)
    (folder / "model" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    save_config(cfg, folder)
    return str(folder)


def production_env(tmp: Path, cfg: LongGenConfig, *, tokens: int) -> dict[str, str]:
    """LONGGEN_* variables for a valid launch of `cfg`: a tokenizer of its vocabulary, a sparse blend of
    `tokens` tokens, and a checkpoint of its shape."""
    docs = [min(tokens - i * 2**30, 2**30) for i in range(-(-tokens // 2**30))]
    return {
        "LONGGEN_TOKENIZER": hf_tokenizer(tmp / "tokenizer", vocab_size=cfg.model.vocab_size),
        "LONGGEN_DATA_BLEND": sparse_indexed_dataset(tmp / "long_docs", doc_lengths=docs),
        "LONGGEN_INIT_CHECKPOINT": checkpoint_metadata(tmp / "ckpt", cfg),
    }


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGGEN_")}
    env.update(extra or {})
    return env
