"""The layer pattern string and its placements."""

import pytest

from megatron_longgen.models.layer_pattern import (
    default_layer_pattern,
    full_pattern,
    layer_kinds,
    num_full_layers,
    validate_layer_pattern,
)


def test_middle_third_is_contiguous_and_centred():
    assert default_layer_pattern(6) == "SSFFSS"
    assert default_layer_pattern(32) == "SSSSSSSSSSFFFFFFFFFFFSSSSSSSSSSS"
    p80 = default_layer_pattern(80)
    assert p80.count("F") == 27 and p80 == "S" * 26 + "F" * 27 + "S" * 27
    for n in range(1, 50):
        p = default_layer_pattern(n)
        first, last = p.index("F"), p.rindex("F")
        assert set(p[first : last + 1]) == {"F"}, p  # one contiguous block
        assert abs(first - (n - 1 - last)) <= 1, p  # centred


def test_placements_and_ratios():
    assert default_layer_pattern(6, placement="bottom") == "FFSSSS"
    assert default_layer_pattern(6, placement="top") == "SSSSFF"
    assert default_layer_pattern(6, placement="interleave") == "SFSSFS"
    assert default_layer_pattern(32, full_fraction=1 / 16).count("F") == 2
    assert default_layer_pattern(30, full_fraction=1 / 5).count("F") == 6
    assert num_full_layers(3, 0.01) == 1
    interleaved = default_layer_pattern(32, placement="interleave")
    gaps = [
        j - i
        for i, j in zip(
            [k for k, c in enumerate(interleaved) if c == "F"][:-1],
            [k for k, c in enumerate(interleaved) if c == "F"][1:],
        )
    ]
    assert max(gaps) - min(gaps) <= 1


def test_full_pattern_and_kinds():
    assert full_pattern(4) == "FFFF"
    assert layer_kinds("SFS") == ["sparse", "full", "sparse"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: validate_layer_pattern("SSF", num_layers=4), "has 3 characters but num_layers is 4"),
        (lambda: validate_layer_pattern("SsFF", num_layers=4), r"only 'S' and 'F', found \['s'\]"),
        (lambda: default_layer_pattern(6, placement="side"), "placement must be one of"),
        (lambda: default_layer_pattern(6, full_fraction=0), r"full_fraction must be in \(0, 1\], got 0"),
        (lambda: default_layer_pattern(0), "num_layers must be >= 1, got 0"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
