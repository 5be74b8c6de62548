"""The natural-text haystack shipped with the package (GNU manual prose, `tools/make_haystack.py`)."""

from __future__ import annotations

import functools
import lzma

from megatron_longgen.data.tokenizers import asset_path

HAYSTACK_ASSET = "haystack_gnu_manuals.txt.xz"


@functools.cache
def haystack_text() -> str:
    """The haystack: ~1.08M characters of prose paragraphs separated by blank lines (ASCII)."""
    path = asset_path(HAYSTACK_ASSET)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python tools/make_haystack.py` to build it")
    return lzma.decompress(path.read_bytes()).decode("ascii")


def haystack_documents(*, min_chars: int = 20_000) -> list[str]:
    """The haystack cut into documents of at least `min_chars` characters at paragraph boundaries."""
    docs, current = [], []
    size = 0
    for paragraph in haystack_text().split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs
