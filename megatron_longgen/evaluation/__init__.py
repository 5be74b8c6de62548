"""Long-context evaluation: passkey and needle-in-a-haystack retrieval, perplexity by position.

Public API (lazy imports; nothing heavy at package import):
- `retrieval.build_sample` / `build_samples` -> `RetrievalSample` (token ids, answer span marked);
  formats and their phrasing in `retrieval.py`;
- `scoring.teacher_forced_correct`, `answer_argmax`, `generation_score`, `accuracy_table`,
  `metrics_for_logging`;
- `long_context.build_long_context_samples` / `evaluate_teacher_forced`: the trainer's periodic eval;
- `runner.generate_answers`: greedy generation through an HF model (the eval tools);
- `perplexity.nll_by_position`; `reporting` (JSON, heat maps, curves); `haystack` (the shipped text).
"""

from __future__ import annotations

_LAZY = {
    "RetrievalSample": "retrieval",
    "build_sample": "retrieval",
    "build_samples": "retrieval",
    "TASKS": "retrieval",
    "teacher_forced_correct": "scoring",
    "answer_argmax": "scoring",
    "generation_score": "scoring",
    "accuracy_table": "scoring",
    "metrics_for_logging": "scoring",
    "build_long_context_samples": "long_context",
    "evaluate_teacher_forced": "long_context",
    "generate_answers": "runner",
    "nll_by_position": "perplexity",
}

__all__ = [
    "TASKS",
    "RetrievalSample",
    "accuracy_table",
    "answer_argmax",
    "build_long_context_samples",
    "build_sample",
    "build_samples",
    "evaluate_teacher_forced",
    "generate_answers",
    "generation_score",
    "metrics_for_logging",
    "nll_by_position",
    "teacher_forced_correct",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"megatron_longgen.evaluation.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'megatron_longgen.evaluation' has no attribute {name!r}")
