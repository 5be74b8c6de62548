"""Megatron-Core indexed datasets (`PREFIX.bin` + `PREFIX.idx`): atomic writing and up-front validation.

Design choices:
- Writing goes through Megatron-Core's `IndexedDatasetBuilder` (so the format is exactly Megatron's), but to
  temporary names; `commit()` renames `.bin` then `.idx` into place. A crash leaves either the old pair or
  no pair, never a half-written one (the `.idx` is written last, so a stale `.bin` without its `.idx` is
  never mistaken for a dataset).
- Reading is Megatron-Core's `IndexedDataset`, but `validate_indexed_prefix` checks the header, the index
  size implied by its counts, and the `.bin` size implied by the sequence lengths first. Megatron itself
  only asserts on the header and would otherwise fail later with an obscure numpy buffer error (or read
  garbage) on a truncated file.

Index layout (Megatron-Core 0.16.1, `_IndexWriter`): 9-byte magic, u64 version (1), u8 dtype code,
u64 sequence count n, u64 document count d, then n int32 lengths, n int64 byte pointers, d int64
document boundaries (0, ..., n), and for multimodal data n int8 modes (not written by this package).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# Megatron-Core's DType codes (indexed_dataset.DType), duplicated so validation needs no megatron import.
_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


@dataclass(frozen=True)
class IndexedInfo:
    """What `validate_indexed_prefix` learned about one dataset."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int


def validate_indexed_prefix(prefix: str) -> IndexedInfo:
    """Check that `prefix.idx` / `prefix.bin` exist and agree; return their counts.

    Raises ValueError naming the file and the numbers when a file is missing, the header is not
    Megatron's, the index is shorter or longer than its counts imply, the document boundaries are not
    0..n and non-decreasing, or the `.bin` size differs from sum(lengths) * itemsize.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise ValueError(f"indexed dataset file {path} does not exist (prefix {prefix!r})")
    idx_size = os.path.getsize(idx_path)
    if idx_size < _HEADER_BYTES:
        raise ValueError(f"{idx_path} is truncated: {idx_size} bytes, a header alone needs {_HEADER_BYTES}")
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if header[:9] != INDEX_MAGIC:
        raise ValueError(
            f"{idx_path} is not a Megatron-Core index (magic {header[:9]!r}, expected {INDEX_MAGIC!r})"
        )
    (version,) = struct.unpack("<Q", header[9:17])
    code = header[17]
    num_seq, num_docs = struct.unpack("<QQ", header[18:34])
    if version != 1:
        raise ValueError(f"{idx_path} has index version {version}; only version 1 is supported")
    if code not in _DTYPES:
        raise ValueError(f"{idx_path} has unknown dtype code {code}; known codes {sorted(_DTYPES)}")
    expected = _HEADER_BYTES + 12 * num_seq + 8 * num_docs
    if idx_size != expected:
        raise ValueError(
            f"{idx_path} is corrupt or truncated: {idx_size} bytes, but {num_seq} sequences and "
            f"{num_docs} document boundaries need {expected}"
        )
    lengths = np.fromfile(idx_path, dtype=np.int32, count=num_seq, offset=_HEADER_BYTES)
    docs = np.fromfile(idx_path, dtype=np.int64, count=num_docs, offset=_HEADER_BYTES + 12 * num_seq)
    if num_docs < 1 or docs[0] != 0 or docs[-1] != num_seq or np.any(np.diff(docs) < 0):
        raise ValueError(
            f"{idx_path} is corrupt: document boundaries must run from 0 to {num_seq} without decreasing "
            f"(got {num_docs} boundaries, first {docs[:1].tolist()}, last {docs[-1:].tolist()})"
        )
    if np.any(lengths < 0):
        raise ValueError(f"{idx_path} is corrupt: negative sequence lengths")
    dtype = _DTYPES[code]
    num_tokens = int(lengths.sum(dtype=np.int64))
    bin_size = os.path.getsize(bin_path)
    expected_bin = num_tokens * np.dtype(dtype).itemsize
    if bin_size != expected_bin:
        raise ValueError(
            f"{bin_path} is corrupt or truncated: {bin_size} bytes, but the index lists {num_tokens} "
            f"tokens of "
            f"{np.dtype(dtype).name} = {expected_bin} bytes"
        )
    return IndexedInfo(
        prefix=prefix, dtype=dtype, num_sequences=num_seq, num_documents=num_docs - 1, num_tokens=num_tokens
    )


def read_document_lengths(prefix: str) -> np.ndarray:
    """Token count per document of a validated dataset written by this package (one sequence per document)."""
    info = validate_indexed_prefix(prefix)
    return np.fromfile(prefix + ".idx", dtype=np.int32, count=info.num_sequences, offset=_HEADER_BYTES)


class AtomicIndexedWriter:
    """Write `prefix.bin/.idx` under temporary names; `commit()` moves them into place.

    Each `add_document(tokens)` stores one document as one sequence (GPT style). Without `commit()` (an
    exception, or `abort()`), the temporary files are removed and any existing dataset at `prefix` is left
    untouched.
    """

    def __init__(self, prefix: str, *, dtype: type):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = f"{prefix}.tmp{os.getpid()}"
        self.dtype = dtype
        self.num_documents = 0
        self.num_tokens = 0
        self._builder = IndexedDatasetBuilder(self._tmp + ".bin", dtype=dtype)
        self._done = False

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (1-D integer array; its values must fit `dtype`)."""
        arr = np.asarray(tokens)
        self._builder.add_document(arr, [arr.size])
        self.num_documents += 1
        self.num_tokens += int(arr.size)

    def commit(self) -> None:
        """Write the index and rename both files to `prefix.bin` / `prefix.idx` (the `.idx` last)."""
        self._builder.finalize(self._tmp + ".idx")
        # Drop an old index first: a new .bin next to an old .idx must never be visible as a dataset.
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")
        self._done = True

    def abort(self) -> None:
        """Drop the temporary files (idempotent)."""
        if not self._done:
            self._builder.data_file.close()
            for ext in (".bin", ".idx"):
                if os.path.exists(self._tmp + ext):
                    os.remove(self._tmp + ext)
            self._done = True

    def __enter__(self) -> AtomicIndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
