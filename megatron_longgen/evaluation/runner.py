"""Run retrieval samples through an HF causal LM with greedy `generate()` and score the generated text.

Samples of one length have exactly the same number of tokens, so they batch without padding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from megatron_longgen.evaluation.retrieval import RetrievalSample, TextTokenizer
from megatron_longgen.evaluation.scoring import generation_score


def _batches(samples: Sequence[RetrievalSample], batch_size: int):
    by_length: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_length.setdefault(len(sample.prompt_ids), []).append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


@torch.no_grad()
def generate_answers(
    model,
    tokenizer: TextTokenizer,
    samples: Sequence[RetrievalSample],
    *,
    batch_size: int = 1,
    extra_tokens: int = 4,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Greedy answers for every sample: [{task, length, depth, score, exact, generated, seconds}] in order.

    `score` = fraction of the sample's values in the decoded generation; `exact` = the first generated
    tokens equal the answer tokens (what teacher forcing measures)."""
    device = next(model.parameters()).device
    records: list[dict | None] = [None] * len(samples)
    eos = getattr(tokenizer, "eos_id", None)
    for indices in _batches(samples, batch_size):
        batch = [samples[i] for i in indices]
        ids = torch.tensor([list(s.prompt_ids) for s in batch], device=device)
        new_tokens = max(len(s.answer_ids) for s in batch) + extra_tokens
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=eos if eos is not None and eos >= 0 else 0,
        )
        seconds = time.perf_counter() - start
        for i, sample, row in zip(indices, batch, out[:, ids.shape[1] :].tolist()):
            text = tokenizer.decode(row)
            records[i] = {
                "task": sample.task,
                "length": sample.length,
                "depth": sample.depth,
                "score": generation_score(sample, text),
                "exact": row[: len(sample.answer_ids)] == list(sample.answer_ids),
                "expected": list(sample.values),
                "generated": text,
                "seconds": seconds / len(batch),
            }
        if progress is not None:
            done = sum(r is not None for r in records)
            progress(f"{done}/{len(samples)} samples (length {batch[0].length}, {seconds:.1f} s per batch)")
    return records
