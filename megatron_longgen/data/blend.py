"""The `DataConfig.blend` string: which Megatron-Core indexed datasets a run reads, and in what proportion.

Two forms, whitespace separated:

    "PREFIX_A PREFIX_B"               no weights: each prefix is weighted by its number of tokens
    "0.7 PREFIX_A 0.3 PREFIX_B"       weights (any positive numbers; normalised by Megatron-Core)

A prefix names the pair `PREFIX.bin` / `PREFIX.idx` written by `tools/preprocess_data.py`. Mixing both
forms in one string is an error. This module has no heavy imports, so `config.py` can validate with it.
"""

from __future__ import annotations


def _as_weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(blend: str) -> tuple[list[str], list[float] | None]:
    """Split a blend string into (prefixes, weights-or-None).

    Raises ValueError on an empty blend, a dangling weight or prefix, a non-positive weight, or a mix of
    weighted and unweighted entries; the message quotes the offending piece.
    """
    items = blend.split()
    if not items:
        raise ValueError("blend is empty: expected 'PREFIX ...' or 'WEIGHT PREFIX WEIGHT PREFIX ...'")
    numeric = [_as_weight(item) is not None for item in items]
    if not any(numeric):
        return items, None
    if len(items) % 2:
        raise ValueError(
            f"blend {blend!r} has {len(items)} items; a weighted blend needs WEIGHT PREFIX pairs"
        )
    prefixes: list[str] = []
    weights: list[float] = []
    for i in range(0, len(items), 2):
        weight, prefix = _as_weight(items[i]), items[i + 1]
        if weight is None or _as_weight(prefix) is not None:
            raise ValueError(
                f"blend {blend!r}: expected WEIGHT PREFIX at items {i} and {i + 1}, "
                f"got {items[i]!r} {prefix!r}"
            )
        if not weight > 0:
            raise ValueError(f"blend {blend!r}: weight of {prefix!r} must be > 0, got {weight}")
        prefixes.append(prefix)
        weights.append(weight)
    return prefixes, weights
