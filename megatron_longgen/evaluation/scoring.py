"""Scoring retrieval samples: from generated text (the eval tools) or from one teacher-forced forward (the
trainer's periodic long-context eval).

Teacher forcing is exact for greedy decoding: greedy produces the answer tokens a_1..a_n after the prompt
if and only if, for every i, the argmax of the next-token logits after prompt + a_1..a_{i-1} is a_i, and
those are exactly the logits one forward over prompt + answer yields at `answer_logit_positions` (a causal
model's logits at a position do not depend on later tokens). So a single forward of `input_ids` decides
the greedy outcome of every sample, batched, no generation loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from megatron_longgen.evaluation.retrieval import RetrievalSample


def answer_argmax(sample: RetrievalSample, logits_TV: torch.Tensor) -> list[int]:
    """Argmax token ids at the answer positions, from the logits [T, V] of one forward over `input_ids`."""
    positions = sample.answer_logit_positions
    if logits_TV.shape[0] < positions.stop:
        raise ValueError(f"logits cover {logits_TV.shape[0]} positions; the answer needs {positions.stop}")
    return logits_TV[positions.start : positions.stop].argmax(dim=-1).tolist()


def teacher_forced_correct(sample: RetrievalSample, argmax_ids: Sequence[int]) -> bool:
    """Would greedy decoding produce the answer? `argmax_ids`: the model's argmax at
    `sample.answer_logit_positions` of one forward over `sample.input_ids`."""
    if len(argmax_ids) != len(sample.answer_ids):
        raise ValueError(f"got {len(argmax_ids)} argmax ids for a {len(sample.answer_ids)}-token answer")
    return list(argmax_ids) == list(sample.answer_ids)


def generation_score(sample: RetrievalSample, generated_text: str) -> float:
    """Fraction of the sample's values found in the generated text (0 or 1 except for multivalue)."""
    found = sum(value in generated_text for value in sample.values)
    return found / len(sample.values)


def accuracy_table(samples: Sequence[RetrievalSample], scores: Sequence[float]) -> dict:
    """{task: {"by_length": {length: mean}, "by_length_depth": {length: {depth: mean}}, "mean": mean}}."""
    if len(samples) != len(scores):
        raise ValueError(f"{len(samples)} samples but {len(scores)} scores")
    cells: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for sample, score in zip(samples, scores):
        cells[sample.task][sample.length][sample.depth].append(float(score))
    out = {}
    for task, by_length in cells.items():
        grid = {
            length: {depth: sum(v) / len(v) for depth, v in sorted(by_depth.items())}
            for length, by_depth in sorted(by_length.items())
        }
        flat = [s for by_depth in by_length.values() for v in by_depth.values() for s in v]
        out[task] = {
            "by_length": {length: sum(row.values()) / len(row) for length, row in grid.items()},
            "by_length_depth": grid,
            "mean": sum(flat) / len(flat),
        }
    return out


def metrics_for_logging(table: dict, *, prefix: str = "eval") -> dict[str, float]:
    """Flat metrics from `accuracy_table`: `eval/passkey_acc` and `eval/passkey_acc_4096`, ..."""
    metrics = {}
    for task, entry in table.items():
        metrics[f"{prefix}/{task}_acc"] = entry["mean"]
        for length, value in entry["by_length"].items():
            metrics[f"{prefix}/{task}_acc_{length}"] = value
    return metrics
