"""Text files -> one Megatron-Core indexed dataset (`PREFIX.bin` / `PREFIX.idx` + `PREFIX.stats.json`).

Pipeline (`preprocess`):
1. Read documents from `.jsonl` (one JSON object per line, text under `text_key`), `.txt` (documents
   separated by blank lines, like the tiny corpus) or `.parquet` (a `text_key` column; needs pyarrow).
   `.jsonl` and `.txt` may be compressed: `.gz` (stdlib) or `.zst` (needs `zstandard`; SlimPajama ships
   `.jsonl.zst`).
   The source of a document (for per-source length sampling) is the value under `source_key` (a dotted
   path such as `meta.redpajama_set_name`) when given, else the input file's name.
2. Tokenize with `workers` processes (ordered `imap`, so the output does not depend on `workers`), with
   `<bos>` in front of every document and no `<eos>` (LongGen's packing; attention is not reset at
   document boundaries). Empty documents are skipped and counted.
3. Without length sampling, the tokens are written straight to a temporary dataset that is renamed into
   place at the end. With length sampling (`length_sampling.py`) they first go to a temporary "raw"
   dataset; the copies per document are drawn from the lengths with `seed`, and the final dataset is
   written from the raw one by memory-mapping it (so corpora larger than memory work).
4. `PREFIX.stats.json` records inputs, tokenizer, counts and the achieved per-source proportions. It is
   written right after the dataset is renamed into place (an old one is removed just before), so stats
   never describe another run's data.

Output is atomic (see `indexed.py`): an interrupted run leaves no half-written dataset; rerunning
starts over.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from megatron_longgen.data.indexed import AtomicIndexedWriter, read_document_lengths
from megatron_longgen.data.length_sampling import (
    LengthSampling,
    draw_copies,
    expected_copies,
    sampling_report,
)
from megatron_longgen.data.tokenizers import Tokenizer

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
COMPRESSIONS = (".gz", ".zst")
_BATCH_DOCS = 64


def _lookup(record: dict, dotted: str, *, where: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where}: key {dotted!r} not found")
        value = value[part]
    return value


def _split_suffix(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None): `a.jsonl.zst` -> (".jsonl", ".zst")."""
    if path.suffix in COMPRESSIONS:
        return Path(path.stem).suffix, path.suffix
    return path.suffix, None


def _open_text(path: Path) -> TextIO:
    compression = _split_suffix(path)[1]
    if compression == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError as exc:
            raise ValueError(
                f"reading {path} needs zstandard, which is not installed: pip install zstandard"
            ) from exc
        return io.TextIOWrapper(
            zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8"
        )
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path, *, text_key: str, source_key: str | None) -> Iterator[tuple[str, str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            text = _lookup(record, text_key, where=where)
            if not isinstance(text, str):
                raise ValueError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
            source = str(_lookup(record, source_key, where=where)) if source_key else path.name
            yield source, text


def _read_txt(path: Path) -> Iterator[tuple[str, str]]:
    # Streams: blank (or whitespace-only) lines separate documents; runs of them are one separator.
    lines: list[str] = []
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield path.name, "".join(lines).strip()
                lines = []
    if lines:
        yield path.name, "".join(lines).strip()


def _read_parquet(path: Path, *, text_key: str, source_key: str | None) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(
            f"reading {path} needs pyarrow, which is not installed: pip install pyarrow"
        ) from exc
    table = pq.ParquetFile(path)
    columns = [text_key] + ([source_key] if source_key else [])
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: columns {missing} not found; the file has {table.schema_arrow.names}")
    for batch in table.iter_batches(columns=columns):
        texts = batch.column(text_key).to_pylist()
        sources = batch.column(source_key).to_pylist() if source_key else [path.name] * len(texts)
        for source, text in zip(sources, texts):
            yield str(source), text or ""


def read_documents(
    inputs: list[str], *, text_key: str = "text", source_key: str | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (source, text) for every document of every input, in order. Checks all inputs exist first.

    Raises ValueError for a missing file, an unsupported suffix (naming the supported ones), bad JSON
    (with file:line), or a missing key/column.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"input file {path} does not exist")
        kind, compression = _split_suffix(path)
        if kind not in SUFFIXES or (compression and kind == ".parquet"):
            raise ValueError(
                f"input file {path}: unsupported suffix {''.join(path.suffixes)!r}; use one of {SUFFIXES}, "
                f"the text ones optionally compressed with one of {COMPRESSIONS}"
            )
    for path in paths:
        kind = _split_suffix(path)[0]
        if kind in (".jsonl", ".json"):
            yield from _read_jsonl(path, text_key=text_key, source_key=source_key)
        elif kind == ".txt":
            yield from _read_txt(path)
        else:
            yield from _read_parquet(path, text_key=text_key, source_key=source_key)


def _batches(docs: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


_WORKER_TOKENIZER: Tokenizer | None = None


def _use_tokenizer(tok: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _init_worker(spec: str) -> None:
    _use_tokenizer(Tokenizer(spec))


def _encode_batch(batch: list[tuple[str, str]]) -> list[tuple[str, list[int] | None]]:
    # None marks an empty document (skipped, but counted).
    return [
        (src, _WORKER_TOKENIZER.encode(text, add_bos=True) if text.strip() else None) for src, text in batch
    ]


def _drop_stale_stats(output_prefix: str) -> None:
    # Called right before the new dataset replaces the old one: a crash between that and writing the new
    # stats leaves a dataset without stats, never one with another run's stats.
    if os.path.exists(output_prefix + ".stats.json"):
        os.remove(output_prefix + ".stats.json")


def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def preprocess(
    *,
    inputs: list[str],
    tokenizer: str,
    output_prefix: str,
    workers: int = 1,
    text_key: str = "text",
    source_key: str | None = None,
    sampling: LengthSampling | None = None,
    seed: int = 1234,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into `output_prefix.bin/.idx` and write `output_prefix.stats.json`; return the stats.

    `tokenizer` is a SentencePiece `.model`, an HF tokenizer folder or `builtin:tiny_sp`. Every document
    becomes one sequence `[<bos>, tokens...]`. Raises ValueError for bad inputs (see `read_documents`), an
    unknown tokenizer, `workers` < 1, or when the inputs hold no non-empty document.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tok = Tokenizer(tokenizer)  # fails early, in this process, on an unknown tokenizer
    sampling = sampling or LengthSampling()
    dtype = _token_dtype(tok.vocab_size)
    docs = read_documents(inputs, text_key=text_key, source_key=source_key)
    first_prefix = output_prefix if sampling.is_identity else f"{output_prefix}.raw{os.getpid()}"
    source_names: dict[str, int] = {}
    source_ids: list[int] = []
    num_empty = 0
    bar = tqdm(desc=f"tokenizing -> {output_prefix}", unit="doc", disable=not progress, dynamic_ncols=True)
    pool = get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) if workers > 1 else None
    try:
        with AtomicIndexedWriter(first_prefix, dtype=dtype) as writer:
            if pool is None:
                _use_tokenizer(tok)
                encoded = map(_encode_batch, _batches(docs))
            else:
                encoded = pool.imap(_encode_batch, _batches(docs))
            for batch in encoded:
                for source, ids in batch:
                    if ids is None:
                        num_empty += 1
                        continue
                    writer.add_document(np.asarray(ids, dtype=dtype))
                    source_ids.append(source_names.setdefault(source, len(source_names)))
                bar.update(len(batch))
                bar.set_postfix(tokens=writer.num_tokens, refresh=False)
            if writer.num_documents == 0:
                raise ValueError(f"inputs {inputs} hold no non-empty documents ({num_empty} empty)")
            if sampling.is_identity:
                _drop_stale_stats(output_prefix)
            writer.commit()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    lengths = read_document_lengths(first_prefix).astype(np.int64)
    ids = np.asarray(source_ids, dtype=np.int64)
    expected = expected_copies(lengths, ids, policy=sampling)
    if sampling.is_identity:
        copies = np.ones_like(lengths, dtype=np.int64)
    else:
        copies = draw_copies(expected, seed=seed)
        try:
            _write_copies(
                raw_prefix=first_prefix,
                output_prefix=output_prefix,
                lengths=lengths,
                copies=copies,
                dtype=dtype,
                progress=progress,
            )
        finally:
            for ext in (".bin", ".idx"):
                if os.path.exists(first_prefix + ext):
                    os.remove(first_prefix + ext)
    stats = {
        "inputs": [str(p) for p in inputs],
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "dtype": np.dtype(dtype).name,
        "empty_documents_skipped": num_empty,
        **sampling_report(
            lengths=lengths,
            source_ids=ids,
            source_names=list(source_names),
            expected=expected,
            copies=copies,
            policy=sampling,
            seed=seed,
        ),
    }
    tmp = f"{output_prefix}.stats.json.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, output_prefix + ".stats.json")
    return stats


def _write_copies(
    *,
    raw_prefix: str,
    output_prefix: str,
    lengths: np.ndarray,
    copies: np.ndarray,
    dtype: type,
    progress: bool,
) -> None:
    """Write document i of `raw_prefix` `copies[i]` times, in order, to `output_prefix` (atomically)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    raw = np.memmap(raw_prefix + ".bin", dtype=dtype, mode="r")
    if int((lengths * copies).sum()) == 0:
        raise ValueError(f"length sampling kept no document of {raw_prefix} (all copies are 0)")
    with AtomicIndexedWriter(output_prefix, dtype=dtype) as writer:
        for i in tqdm(range(lengths.size), desc="length sampling", unit="doc", disable=not progress):
            for _ in range(copies[i]):
                writer.add_document(raw[offsets[i] : offsets[i + 1]])
        _drop_stale_stats(output_prefix)
        writer.commit()
    del raw
