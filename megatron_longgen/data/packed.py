"""Pack a plain-text corpus into fixed-length training sequences (the tiny/CPU path).

Documents are separated by blank lines. Each document is tokenized with `<bos>` in front (LongGen marks
document starts with `<bos>`; attention is not reset at boundaries, as in the Fu et al. 2024 recipe the
paper follows), the token streams are concatenated, and the stream is cut into samples of `seq_length + 1`
tokens that overlap by one (inputs = tokens[:-1], labels = tokens[1:]).

The whole corpus lives in memory, which is right for the shipped ~1.5 MB corpus and small experiments; real
runs use Megatron-Core indexed datasets (`tools/preprocess_data.py`, `data/datasets.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_longgen.data.tokenizers import BUILTIN_CORPORA, Tokenizer, resolve_builtin


def read_documents(corpus: str) -> list[str]:
    """Blank-line separated documents of a text file (or `builtin:tiny_stories`)."""
    path = Path(resolve_builtin(corpus, BUILTIN_CORPORA, "corpus"))
    if not path.is_file():
        raise ValueError(f"corpus file {path} does not exist")
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"corpus {path} holds no documents")
    return docs


class PackedTokens(torch.utils.data.Dataset):
    """Samples of `seq_length` input tokens with labels, loss mask and position ids (all int64/float)."""

    def __init__(self, stream: torch.Tensor, *, seq_length: int):
        self.seq_length = seq_length
        self.num_samples = (stream.numel() - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(
                f"{stream.numel()} tokens cannot fill one sample of seq_length {seq_length} (+1 for the labels)"
            )
        self.stream = stream

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range [0, {self.num_samples})")
        start = idx * self.seq_length
        chunk = self.stream[start : start + self.seq_length + 1]
        return {
            "tokens": chunk[:-1].clone(),
            "labels": chunk[1:].clone(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


def build_packed_datasets(
    corpus: str, *, tokenizer: Tokenizer, seq_length: int, valid_fraction: float
) -> tuple[PackedTokens, PackedTokens | None]:
    """Train (and held-out) datasets from a text corpus; the last `valid_fraction` of documents are held out."""
    docs = read_documents(corpus)
    num_valid = round(len(docs) * valid_fraction)
    if valid_fraction > 0 and num_valid == 0:
        num_valid = 1
    train_docs, valid_docs = docs[: len(docs) - num_valid], docs[len(docs) - num_valid :]

    def stream(items: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for doc in items:
            ids.extend(tokenizer.encode(doc, add_bos=True))
        return torch.tensor(ids, dtype=torch.int64)

    train = PackedTokens(stream(train_docs), seq_length=seq_length)
    valid = None
    if valid_docs:
        valid_stream = stream(valid_docs)
        valid = (
            PackedTokens(valid_stream, seq_length=seq_length) if valid_stream.numel() > seq_length else None
        )
    return train, valid
