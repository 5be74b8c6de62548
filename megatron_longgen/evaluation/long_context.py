"""The trainer's periodic long-context eval (`eval.long_context_interval`): pure pieces, no model code.

How the trainer uses it (once at start-up, then every `long_context_interval` steps)::

    samples = build_long_context_samples(cfg.eval, tokenizer, seq_length=cfg.train.seq_length)
    ...
    correct = []
    for sample in samples:                        # each sample is exactly `length` tokens
        logits_TV = <forward of sample.input_ids, position ids 0..T-1>   # the model's own forward
        correct.append(teacher_forced_correct(sample, answer_argmax(sample, logits_TV)))
    metrics = metrics_for_logging(accuracy_table(samples, correct))
    logger.log(metrics, step)   # {"eval/passkey_acc": ..., "eval/passkey_acc_4096": ..., ...}

`evaluate_teacher_forced(samples, logits_fn)` runs that loop for any callable returning [T, V] logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_longgen.config import EvalConfig
from megatron_longgen.evaluation.retrieval import RetrievalSample, TextTokenizer, build_samples
from megatron_longgen.evaluation.scoring import (
    accuracy_table,
    answer_argmax,
    metrics_for_logging,
    teacher_forced_correct,
)

TASK_NAMES = {"passkey": "passkey", "niah": "niah_single"}


def build_long_context_samples(
    cfg: EvalConfig, tokenizer: TextTokenizer, *, seq_length: int
) -> list[RetrievalSample]:
    """The eval set of `cfg`: every task x length x depth x sample; lengths default to `seq_length`."""
    lengths = list(cfg.long_context_lengths) or [seq_length]
    samples = []
    for task in cfg.long_context_tasks:
        samples += build_samples(
            tokenizer,
            task=TASK_NAMES[task],
            lengths=lengths,
            depths=list(cfg.long_context_depths),
            num_samples=cfg.long_context_samples,
            seed=cfg.long_context_seed,
        )
    return samples


@torch.no_grad()
def evaluate_teacher_forced(
    samples: Sequence[RetrievalSample],
    logits_fn: Callable[[list[int]], torch.Tensor],
    *,
    prefix: str = "eval",
) -> dict[str, float]:
    """Accuracy metrics of `samples`, given `logits_fn(input_ids) -> logits [T, V]` (one forward each)."""
    correct = [teacher_forced_correct(s, answer_argmax(s, logits_fn(s.input_ids))) for s in samples]
    return metrics_for_logging(accuracy_table(samples, correct), prefix=prefix)
