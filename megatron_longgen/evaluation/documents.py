"""Long documents for perplexity-by-position, as token ids (`<bos>` first), each exactly `max_tokens` long."""

from __future__ import annotations

import json
from pathlib import Path

HAYSTACK = "builtin:haystack"


def _texts(spec: str):
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"document file {spec} does not exist (or use {HAYSTACK})")
    if path.suffix == ".jsonl":
        with path.open() as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    record = json.loads(line)
                    if "text" not in record:
                        raise ValueError(f"{spec}:{number}: no 'text' field")
                    yield record["text"]
    else:
        yield path.read_text()


def load_documents(specs: list[str], tokenizer, *, max_tokens: int, num_docs: int) -> list[list[int]]:
    """The first `num_docs` documents of at least `max_tokens` tokens, cut to `max_tokens`.

    `specs`: text files (one document each), `.jsonl` files (a `text` field per line), or `builtin:haystack`
    (the shipped GNU-manual prose, cut into consecutive windows)."""
    if max_tokens < 2 or num_docs < 1:
        raise ValueError(f"need max_tokens >= 2 and num_docs >= 1, got {max_tokens} and {num_docs}")
    docs: list[list[int]] = []
    longest = 0
    for spec in specs:
        if spec == HAYSTACK:
            from megatron_longgen.evaluation.haystack import haystack_text

            ids = tokenizer.encode(haystack_text())
            width = max_tokens - 1
            for start in range(0, len(ids) - width + 1, width):
                docs.append([tokenizer.bos_id, *ids[start : start + width]])
            longest = max(longest, len(ids) + 1)
            continue
        for text in _texts(spec):
            ids = tokenizer.encode(text, add_bos=True)
            longest = max(longest, len(ids))
            if len(ids) >= max_tokens:
                docs.append(ids[:max_tokens])
    if not docs:
        raise ValueError(
            f"no document has {max_tokens} tokens (longest: {longest}); lower --max-tokens or pass longer documents"
        )
    return docs[:num_docs]
