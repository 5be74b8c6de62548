"""Per-source length up-sampling (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K
Context"), applied once, when the indexed dataset is written.

The recipe keeps each source's (domain's) share of tokens, but inside every source shifts the token mass
towards long documents. We express it as a relative weight per document:

    w0(d) = long_weight   if len(d) >= long_threshold      (e.g. 4096 tokens)
            short_weight  otherwise                         (e.g. 0.1: "keep short documents with p = 0.1")

and, with `keep_source_shares`, rescale the weights of each source s by

    c_s = T_s / sum_{d in s} w0(d) * len(d)        (T_s = tokens of s in the input)

so that the expected output token count of s equals its input count: the source mixture is unchanged,
only the length distribution inside each source moves. `target_tokens` then scales everything by one
global factor (e.g. to draw 5B tokens). A document with expected count e = g * c_s * w0(d) is written
floor(e) times plus once more with probability e - floor(e) (so 2.3 means 2 or 3 copies, 0.1 means kept
with probability 0.1), from one seeded `numpy.random.Generator`: the same input in the same order and the
same seed give the same output, whatever the number of tokenizer workers.

The copies are written next to each other; Megatron-Core's GPTDataset shuffles documents per epoch, so
they end up spread over the run. The achieved numbers go to a JSON report next to the dataset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(kw_only=True, frozen=True)
class LengthSampling:
    """How documents are re-weighted by length before they are written."""

    long_threshold: int = 4096
    """Documents with at least this many tokens (including `<bos>`) count as long."""
    long_weight: float = 1.0
    """Relative sampling weight of a long document (e.g. 3.0 up-samples long documents)."""
    short_weight: float = 1.0
    """Relative sampling weight of a short document (e.g. 0.1 keeps short documents with p = 0.1)."""
    keep_source_shares: bool = True
    """Rescale each source so that its expected token count (and so its share) is unchanged."""
    target_tokens: int | None = None
    """Scale all sources together so that the expected total is this many tokens (None: no scaling)."""

    def __post_init__(self) -> None:
        if self.long_threshold < 1:
            raise ValueError(f"long_threshold must be >= 1, got {self.long_threshold}")
        if self.long_weight < 0 or self.short_weight < 0 or self.long_weight + self.short_weight == 0:
            raise ValueError(
                f"long_weight and short_weight must be >= 0 and not both 0, got {self.long_weight} and "
                f"{self.short_weight}"
            )
        if self.target_tokens is not None and self.target_tokens < 1:
            raise ValueError(f"target_tokens must be >= 1, got {self.target_tokens}")

    @property
    def is_identity(self) -> bool:
        """True when every document is written exactly once."""
        return self.long_weight == self.short_weight == 1.0 and self.target_tokens is None


def expected_copies(lengths: np.ndarray, source_ids: np.ndarray, *, policy: LengthSampling) -> np.ndarray:
    """Expected number of copies of each document (float64 [num_docs]); see the module docstring.

    `lengths` [num_docs] are token counts, `source_ids` [num_docs] small non-negative ints naming sources.
    Raises ValueError when `target_tokens` is set but no document can be drawn.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    source_ids = np.asarray(source_ids, dtype=np.int64)
    is_long = lengths >= policy.long_threshold
    weights = np.where(is_long, policy.long_weight, policy.short_weight)
    if policy.keep_source_shares:
        num_sources = int(source_ids.max()) + 1 if source_ids.size else 0
        tokens_in = np.bincount(source_ids, weights=lengths, minlength=num_sources)
        weighted = np.bincount(source_ids, weights=weights * lengths, minlength=num_sources)
        # A source whose every document has weight 0 (e.g. only short documents and short_weight 0) is
        # dropped; its share cannot be kept.
        scale = np.divide(tokens_in, weighted, out=np.zeros_like(tokens_in), where=weighted > 0)
        weights = weights * scale[source_ids]
    if policy.target_tokens is not None:
        total = float((weights * lengths).sum())
        if total <= 0:
            raise ValueError(f"target_tokens {policy.target_tokens}: no document has a non-zero weight")
        weights = weights * (policy.target_tokens / total)
    return weights


def draw_copies(expected: np.ndarray, *, seed: int) -> np.ndarray:
    """Integer copies per document: floor(e) plus one with probability frac(e), from a seeded generator."""
    rng = np.random.default_rng(seed)
    base = np.floor(expected)
    return (base + (rng.random(expected.shape[0]) < expected - base)).astype(np.int64)


def sampling_report(
    *,
    lengths: np.ndarray,
    source_ids: np.ndarray,
    source_names: list[str],
    expected: np.ndarray,
    copies: np.ndarray,
    policy: LengthSampling,
    seed: int,
) -> dict:
    """JSON-ready summary: per source, documents and tokens in and out, long-token fraction and share of
    all tokens, before and after, and the expected values the draw aimed at."""
    lengths = np.asarray(lengths, dtype=np.int64)
    is_long = lengths >= policy.long_threshold
    total_in = int(lengths.sum())
    total_out = int((lengths * copies).sum())
    total_expected = float((lengths * expected).sum())
    sources = {}
    for sid, name in enumerate(source_names):
        sel = source_ids == sid
        tok_in = int(lengths[sel].sum())
        long_in = int(lengths[sel & is_long].sum())
        tok_out = int((lengths[sel] * copies[sel]).sum())
        long_out = int((lengths[sel & is_long] * copies[sel & is_long]).sum())
        tok_exp = float((lengths[sel] * expected[sel]).sum())
        long_exp = float((lengths[sel & is_long] * expected[sel & is_long]).sum())
        sources[name] = {
            "documents_in": int(sel.sum()),
            "documents_out": int(copies[sel].sum()),
            "tokens_in": tok_in,
            "tokens_out": tok_out,
            "tokens_expected": tok_exp,
            "long_documents_in": int((sel & is_long).sum()),
            "long_token_fraction_in": long_in / tok_in if tok_in else 0.0,
            "long_token_fraction_out": long_out / tok_out if tok_out else 0.0,
            "long_token_fraction_expected": long_exp / tok_exp if tok_exp else 0.0,
            "share_in": tok_in / total_in if total_in else 0.0,
            "share_out": tok_out / total_out if total_out else 0.0,
            "share_expected": tok_exp / total_expected if total_expected else 0.0,
        }
    return {
        "policy": asdict(policy),
        "seed": seed,
        "documents_in": int(lengths.size),
        "documents_out": int(copies.sum()),
        "tokens_in": total_in,
        "tokens_out": total_out,
        "sources": sources,
    }
