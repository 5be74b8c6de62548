"""Synthetic long-range retrieval documents for training: record tables hidden in natural text, queried at the end.

A document is a haystack cut from the training text (slices of natural documents, joined at line
boundaries) with a few *records* inserted at random depths, followed by lookups of those records:

    ...haystack...
    record 5f3a91 -> value 2841937                     (one of three record styles, see RECORD_STYLES)
    ...haystack...
    | record | value |
    | 0c77e2 | 93150 |                                   (a small table: several records at one depth)
    ...haystack...
    Lookup: which value does record 5f3a91 hold? 2841937
    Lookup: which value does record 0c77e2 hold? 93150

The answer tokens are only predictable by attending back to the record, wherever it is; the loss on them
teaches long-range lookup with the same objective as the rest of the data (no special masking).

The formats are deliberately unlike the evaluation's: passkey ("The pass key is 12345. Remember it. 12345
is the pass key.") and NIAH ("The special magic number for X is: N") never appear, records are keyed by
hex ids (not words or cities) and their values have 5-8 digits. The haystack comes from the training
documents, never from the evaluation's haystack (Debian manuals and /usr/share/doc).
"""

from __future__ import annotations

import random

RECORD_STYLES = (
    "record {key} -> value {value}",
    "registry entry {key} stores {value}.",
    "[{key}] = {value}",
)
TABLE_HEADER = "| record | value |"
TABLE_ROW = "| {key} | {value} |"
QUERY = "Lookup: which value does record {key} hold? {value}"


def _record(rng: random.Random, used: set[str]) -> tuple[str, str]:
    """A fresh 6-hex-digit key (unique in the document) and a 5-8 digit value."""
    key = f"{rng.getrandbits(24):06x}"
    while key in used:
        key = f"{rng.getrandbits(24):06x}"
    used.add(key)
    digits = rng.randint(5, 8)
    return key, str(rng.randrange(10 ** (digits - 1), 10**digits))


def _haystack_lines(texts: list[str], *, num_chars: int, rng: random.Random) -> list[str]:
    """Lines from random slices of `texts` until `num_chars` characters are gathered."""
    lines: list[str] = []
    gathered = 0
    while gathered < num_chars:
        text = texts[rng.randrange(len(texts))]
        want = min(num_chars - gathered, len(text))
        start = rng.randrange(0, max(1, len(text) - want))
        start = text.rfind("\n", 0, start) + 1  # snap to a line start
        piece = text[start : start + want].split("\n")
        lines.extend(piece)
        gathered += max(1, sum(len(line) + 1 for line in piece))
    return lines


def retrieval_document(texts: list[str], *, num_chars: int, rng: random.Random) -> tuple[str, int]:
    """(document of about `num_chars` characters, number of records) from haystack `texts` (non-empty)."""
    lines = _haystack_lines(texts, num_chars=num_chars, rng=rng)
    num_insertions = rng.randint(1, 4)
    records: list[tuple[str, str]] = []
    used: set[str] = set()
    # Insert from the deepest position up, so earlier positions stay valid.
    for position in sorted((rng.randrange(len(lines) + 1) for _ in range(num_insertions)), reverse=True):
        if rng.random() < 0.25:
            rows = [_record(rng, used) for _ in range(rng.randint(2, 5))]
            block = [TABLE_HEADER] + [TABLE_ROW.format(key=k, value=v) for k, v in rows]
        else:
            rows = [_record(rng, used)]
            block = [rng.choice(RECORD_STYLES).format(key=rows[0][0], value=rows[0][1])]
        records.extend(rows)
        lines[position:position] = block
    queried = rng.sample(records, k=rng.randint(1, len(records)))
    lines.append("")
    lines.extend(QUERY.format(key=k, value=v) for k, v in queried)
    return "\n".join(lines), len(records)


def retrieval_documents(
    texts: list[str], *, total_chars: int, doc_chars: tuple[int, ...], seed: int
) -> tuple[list[str], int]:
    """Documents totalling about `total_chars` characters, each about one of `doc_chars` long (chosen at
    random); returns (documents, number of records). Deterministic in `seed`."""
    if not texts:
        raise ValueError("retrieval documents need haystack text, got no documents")
    rng = random.Random(seed)
    docs: list[str] = []
    num_records = 0
    made = 0
    while made < total_chars:
        doc, n = retrieval_document(texts, num_chars=rng.choice(doc_chars), rng=rng)
        docs.append(doc)
        num_records += n
        made += len(doc)
    return docs, num_records
