"""The per-layer attention layout as one string: `S` = static sparse attention, `F` = full attention.

The string is read bottom layer first: `"SSFFSS"` is a 6-layer model whose layers 2 and 3 are full.
LongGen keeps a contiguous *middle* third full (the paper's ablation: middle beats top, bottom and
interleaved placements; ratio 1/3 chosen over 1/16 and 1/5). `default_layer_pattern` derives that for any
depth, plus the ablation placements:

    middle     SSSSSSSSSSFFFFFFFFFFFSSSSSSSSSSS   (32 layers, 1/3 -> 11 full, centred)
    bottom     FFFFFFFFFFFSSSSSSSSSSSSSSSSSSSSS
    top        SSSSSSSSSSSSSSSSSSSSSFFFFFFFFFFF
    interleave SFSSFSSFSSFSSFSSFSFSSFSSFSSFSSFS   (full layers spread evenly)
"""

from __future__ import annotations

from typing import Literal

SPARSE = "S"
FULL = "F"
PLACEMENTS = ("middle", "bottom", "top", "interleave")
Placement = Literal["middle", "bottom", "top", "interleave"]


def validate_layer_pattern(pattern: str, *, num_layers: int) -> None:
    """Raise ValueError unless `pattern` has `num_layers` characters, each `S` or `F`."""
    if len(pattern) != num_layers:
        raise ValueError(
            f"layer_pattern {pattern!r} has {len(pattern)} characters but num_layers is {num_layers}"
        )
    bad = sorted(set(pattern) - {SPARSE, FULL})
    if bad:
        raise ValueError(f"layer_pattern {pattern!r} may contain only 'S' and 'F', found {bad}")


def num_full_layers(num_layers: int, full_fraction: float) -> int:
    """round(num_layers * full_fraction), at least 1 and at most num_layers."""
    if not 0.0 < full_fraction <= 1.0:
        raise ValueError(f"full_fraction must be in (0, 1], got {full_fraction}")
    return min(num_layers, max(1, round(num_layers * full_fraction)))


def default_layer_pattern(
    num_layers: int, *, full_fraction: float = 1 / 3, placement: Placement = "middle"
) -> str:
    """The LongGen layout: `round(num_layers * full_fraction)` full layers placed as asked.

    `middle` centres one contiguous block (when the sparse remainder is odd, the extra sparse layer goes
    to the top). `interleave` spreads the full layers evenly, each at the centre of its share.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    n_full = num_full_layers(num_layers, full_fraction)
    n_sparse = num_layers - n_full
    if placement == "middle":
        below = n_sparse // 2
        return SPARSE * below + FULL * n_full + SPARSE * (n_sparse - below)
    if placement == "bottom":
        return FULL * n_full + SPARSE * n_sparse
    if placement == "top":
        return SPARSE * n_sparse + FULL * n_full
    layers = [SPARSE] * num_layers
    for i in range(n_full):
        layers[int((i + 0.5) * num_layers / n_full)] = FULL
    return "".join(layers)


def full_pattern(num_layers: int) -> str:
    """All layers full: the plain Llama baseline built through the same code path."""
    return FULL * num_layers


def layer_kinds(pattern: str) -> list[str]:
    """`"SSF"` -> `["sparse", "sparse", "full"]`."""
    return ["sparse" if c == SPARSE else "full" for c in pattern]
