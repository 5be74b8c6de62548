"""Perplexity by token position on long documents: does the model use distant context?

For every document (tokens 0..T-1, `<bos>` first) one forward gives -log p(token t | tokens < t) for
t = 1..T-1; those are averaged per position bin over documents, and ppl = exp(mean). A model that uses
distant context keeps getting better (lower) far into the document; one that cannot see past its window
flattens at the window size. Logits are computed `chunk` positions at a time from the final hidden states
(a [T, vocab] fp32 tensor at 64K tokens and a 49K vocabulary would be 12.6 GB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def token_nll(model, ids: Sequence[int], *, chunk: int = 4096) -> torch.Tensor:
    """[T - 1] fp32: entry i = -log p(ids[i + 1] | ids[: i + 1]) under `model` (an HF causal LM)."""
    device = next(model.parameters()).device
    tokens = torch.tensor(list(ids), dtype=torch.long, device=device)[None]
    hidden = model.model(input_ids=tokens, use_cache=False).last_hidden_state[0]
    targets = tokens[0, 1:]
    nll = torch.empty(len(targets), dtype=torch.float32, device=device)
    for start in range(0, len(targets), chunk):
        logits = model.lm_head(hidden[start : start + chunk][: len(targets) - start]).float()
        nll[start : start + chunk] = F.cross_entropy(logits, targets[start : start + chunk], reduction="none")
    return nll.cpu()


def nll_by_position(model, documents: Sequence[Sequence[int]], *, bin_size: int, chunk: int = 4096) -> dict:
    """Mean NLL and perplexity per bin of predicted-token positions [start, end), over all documents.

    Returns {"bins": [{"start", "end", "nll", "ppl", "tokens"}], "documents", "tokens", "nll", "ppl"}."""
    if not documents:
        raise ValueError("no documents to evaluate")
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    longest = max(len(d) for d in documents)
    num_bins = math.ceil(longest / bin_size)
    sums = torch.zeros(num_bins, dtype=torch.float64)
    counts = torch.zeros(num_bins, dtype=torch.float64)
    for doc in documents:
        if len(doc) < 2:
            continue
        nll = token_nll(model, doc, chunk=chunk).double()
        positions = torch.arange(1, len(doc))  # the position of the predicted token
        bins = positions // bin_size
        sums.index_add_(0, bins, nll)
        counts.index_add_(0, bins, torch.ones_like(nll))
    rows = []
    for b in range(num_bins):
        if counts[b] == 0:
            continue
        mean = (sums[b] / counts[b]).item()
        rows.append(
            {
                "start": b * bin_size,
                "end": (b + 1) * bin_size,
                "nll": mean,
                "ppl": math.exp(min(mean, 700.0)),
                "tokens": int(counts[b].item()),
            }
        )
    total = counts.sum().item()
    mean_all = (sums.sum() / max(total, 1)).item()
    return {
        "bins": rows,
        "documents": len(documents),
        "tokens": int(total),
        "nll": mean_all,
        "ppl": math.exp(min(mean_all, 700.0)),
    }
