"""Indexed datasets: atomic writing, and clear errors for missing, corrupt or truncated `.bin/.idx`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from megatron_longgen.data.indexed import AtomicIndexedWriter, validate_indexed_prefix

DOCS = [
    np.array([1, 5, 6, 7], dtype=np.uint16),
    np.array([1, 9], dtype=np.uint16),
    np.array([1, 3, 3], dtype=np.uint16),
]


def _write(prefix: str, docs=DOCS) -> None:
    with AtomicIndexedWriter(prefix, dtype=np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
        writer.commit()


def test_round_trip_through_megatron_reader(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path / "ds")
    _write(prefix)
    info = validate_indexed_prefix(prefix)
    assert (info.num_documents, info.num_sequences, info.num_tokens) == (3, 3, 9)
    assert info.dtype is np.uint16
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [d.tolist() for d in DOCS]
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


def test_failed_write_leaves_old_dataset_and_no_temporaries(tmp_path):
    prefix = str(tmp_path / "ds")
    _write(prefix)
    before = {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")}
    with pytest.raises(RuntimeError, match="boom"), AtomicIndexedWriter(prefix, dtype=np.uint16) as writer:
        writer.add_document(np.array([1, 2], dtype=np.uint16))
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    assert {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")} == before


def _corrupt(prefix: str, ext: str, how: str) -> None:
    path = prefix + ext
    data = Path(path).read_bytes()
    if how == "truncate":
        data = data[:-3]
    elif how == "extend":
        data = data + b"\x00\x00"
    elif how == "magic":
        data = b"XXXXXXXXX" + data[9:]  # overwrite the 9-byte magic header with garbage
    elif how == "header_only":
        data = data[:20]
    elif how == "bad_boundaries":
        # Last document boundary (int64 at the end of the index) pointing past the sequences.
        data = data[:-8] + np.int64(7).tobytes()
    Path(path).write_bytes(data)


@pytest.mark.parametrize(
    "ext, how, match",
    [
        (
            ".bin",
            "truncate",
            r"ds\.bin is corrupt or truncated: 15 bytes, but the index lists 9 tokens of uint16 = 18",
        ),
        (".bin", "extend", r"ds\.bin is corrupt or truncated: 20 bytes"),
        (".idx", "truncate", r"ds\.idx is corrupt or truncated: \d+ bytes, but 3 sequences and 4 document"),
        (".idx", "magic", r"ds\.idx is not a Megatron-Core index"),
        (".idx", "header_only", r"ds\.idx is truncated: 20 bytes"),
        (".idx", "bad_boundaries", r"ds\.idx is corrupt: document boundaries must run from 0 to 3"),
    ],
)
def test_corrupt_files_raise_naming_the_file(tmp_path, ext, how, match):
    prefix = str(tmp_path / "ds")
    _write(prefix)
    _corrupt(prefix, ext, how)
    with pytest.raises(ValueError, match=match):
        validate_indexed_prefix(prefix)


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file(tmp_path, missing):
    prefix = str(tmp_path / "ds")
    _write(prefix)
    os.remove(prefix + missing)
    with pytest.raises(ValueError, match=rf"indexed dataset file .*ds\{missing} does not exist"):
        validate_indexed_prefix(prefix)
