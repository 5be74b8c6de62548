"""Per-source length up-sampling: proportions within tolerance, determinism, validation (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_longgen.data.length_sampling import (
    LengthSampling,
    draw_copies,
    expected_copies,
    sampling_report,
)

THRESHOLD = 1000


def _corpus(seed: int = 0):
    """Three sources with different length mixes: 'web' mostly short, 'books' mostly long, 'code' mixed."""
    rng = np.random.default_rng(seed)
    parts = []
    for sid, (num_docs, long_prob) in enumerate([(20000, 0.02), (1000, 0.8), (5000, 0.2)]):
        is_long = rng.random(num_docs) < long_prob
        lengths = np.where(
            is_long, rng.integers(THRESHOLD, 8 * THRESHOLD, num_docs), rng.integers(20, THRESHOLD, num_docs)
        )
        parts.append((lengths, np.full(num_docs, sid)))
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        ["web", "books", "code"],
    )


def _report(policy: LengthSampling, seed: int = 7) -> dict:
    lengths, ids, names = _corpus()
    expected = expected_copies(lengths, ids, policy=policy)
    copies = draw_copies(expected, seed=seed)
    return sampling_report(
        lengths=lengths,
        source_ids=ids,
        source_names=names,
        expected=expected,
        copies=copies,
        policy=policy,
        seed=seed,
    )


def test_upsampling_keeps_source_shares_and_hits_long_fraction():
    policy = LengthSampling(long_threshold=THRESHOLD, long_weight=3.0, short_weight=0.1)
    report = _report(policy)
    for name, src in report["sources"].items():
        # Closed form: long tokens weighted 3, short 0.1, then the source rescaled to its input tokens.
        long_in = src["long_token_fraction_in"]
        closed = 3 * long_in / (3 * long_in + 0.1 * (1 - long_in))
        assert src["long_token_fraction_expected"] == pytest.approx(closed, rel=1e-9), name
        assert abs(src["long_token_fraction_out"] - closed) < 0.03, (name, src)
        assert src["share_expected"] == pytest.approx(src["share_in"], rel=1e-9), name
        assert abs(src["share_out"] - src["share_in"]) < 0.02, (name, src)
        assert src["long_token_fraction_out"] > src["long_token_fraction_in"], name
    assert abs(report["tokens_out"] / report["tokens_in"] - 1) < 0.03


def test_target_tokens_scales_all_sources_together():
    lengths, _, _ = _corpus()
    target = int(lengths.sum()) * 3
    report = _report(LengthSampling(long_threshold=THRESHOLD, long_weight=2.0, target_tokens=target))
    assert abs(report["tokens_out"] / target - 1) < 0.03
    for name, src in report["sources"].items():
        assert abs(src["share_out"] - src["share_in"]) < 0.02, name


def test_without_share_keeping_long_sources_grow():
    report = _report(LengthSampling(long_threshold=THRESHOLD, long_weight=4.0, keep_source_shares=False))
    books, web = report["sources"]["books"], report["sources"]["web"]
    assert books["share_out"] > books["share_in"] + 0.05
    assert web["share_out"] < web["share_in"]
    # Short documents have weight 1: every one is written exactly once.
    lengths, ids, _ = _corpus()
    copies = draw_copies(
        expected_copies(
            lengths,
            ids,
            policy=LengthSampling(long_threshold=THRESHOLD, long_weight=4.0, keep_source_shares=False),
        ),
        seed=1,
    )
    assert np.all(copies[lengths < THRESHOLD] == 1) and np.all(copies[lengths >= THRESHOLD] == 4)


def test_draw_is_seeded():
    lengths, ids, _ = _corpus()
    expected = expected_copies(
        lengths, ids, policy=LengthSampling(long_threshold=THRESHOLD, short_weight=0.3)
    )
    a, b, c = draw_copies(expected, seed=5), draw_copies(expected, seed=5), draw_copies(expected, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a)) <= {0, 1, 2, 3, 4}


def test_identity_policy():
    assert LengthSampling().is_identity
    assert not LengthSampling(short_weight=0.5).is_identity
    lengths, ids, _ = _corpus()
    assert np.all(expected_copies(lengths, ids, policy=LengthSampling()) == 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"long_threshold": 0}, "long_threshold must be >= 1, got 0"),
        ({"long_weight": -1.0}, "got -1.0 and 1.0"),
        ({"long_weight": 0.0, "short_weight": 0.0}, "not both 0"),
        ({"target_tokens": 0}, "target_tokens must be >= 1, got 0"),
    ],
)
def test_policy_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LengthSampling(**kwargs)
