"""Pipeline stages balanced by estimated cost instead of by layer count.

At 128K a full-attention layer costs several times a sparse one (attention pairs grow as S², the sparse
layers' as S·budget), and LongGen keeps the full layers in the middle of the stack. Equal layer counts
then make the middle stages the bottleneck of every pipeline step. `balanced_stage_sizes` splits the
layers into contiguous stages minimising the most expensive stage (exact dynamic programme over prefix
sums, O(stages · layers²)); `megatron_layout` turns the sizes into Megatron-Core's
`pipeline_model_parallel_layout` (flat list in model order: chunk `vp * pp + pp_rank`), with the
embedding on the first chunk and the loss (output layer) on the last.

Costs are the per-layer forward FLOPs of `training/flops.py` at the run's sequence length; the output
layer's logits are added to the last stage.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_longgen.config import LongGenConfig


def balanced_stage_sizes(
    costs: Sequence[float], *, num_stages: int, first_extra: float = 0.0, last_extra: float = 0.0
) -> list[int]:
    """Layers per stage (contiguous, each >= 1) minimising the largest stage cost.

    `first_extra` / `last_extra` are added to the first / last stage (embedding, logits). Among optimal
    splits the one with the earliest cut points wins, so the result is deterministic.
    Raises ValueError when there are fewer layers than stages or a cost is negative.
    """
    n = len(costs)
    if num_stages < 1 or n < num_stages:
        raise ValueError(f"need 1 <= num_stages <= number of layers, got {num_stages} stages for {n} layers")
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must be >= 0, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(start: int, end: int, index: int) -> float:
        extra = (first_extra if index == 0 else 0.0) + (last_extra if index == num_stages - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    inf = float("inf")
    # best[k][i]: minimal max-cost placing the first i layers in k stages; cut[k][i]: start of stage k.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], stage_cost(j, i, k - 1))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, end = [], n
    for k in range(num_stages, 0, -1):
        start = cut[k][end]
        sizes.append(end - start)
        end = start
    return sizes[::-1]


def megatron_layout(sizes: Sequence[int]) -> list[list[str]]:
    """Megatron-Core `pipeline_model_parallel_layout` (list form) for per-chunk layer counts."""
    layout = [["decoder"] * s for s in sizes]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def pipeline_stage_sizes(cfg: LongGenConfig) -> list[int] | None:
    """Layers per model chunk (pp × vpp chunks, model order) for `cfg`, or None when Megatron's even
    split applies (no pipeline parallelism, or `train.pipeline_layout == "even"`)."""
    from megatron_longgen.training.flops import layer_forward_flops

    pp = cfg.parallel.pipeline_parallel
    vpp = cfg.parallel.virtual_pipeline_parallel or 1
    if pp * vpp == 1 or cfg.train.pipeline_layout == "even":
        return None
    seq = cfg.train.seq_length
    costs = layer_forward_flops(model=cfg.model, sparse=cfg.sparse, seq_length=seq)
    logits = 2.0 * seq * cfg.model.hidden_size * cfg.model.vocab_size
    return balanced_stage_sizes(costs, num_stages=pp * vpp, last_extra=logits)


def pipeline_layout(cfg: LongGenConfig) -> list[list[str]] | None:
    """The `pipeline_model_parallel_layout` to give Megatron for `cfg` (None: Megatron's even split)."""
    sizes = pipeline_stage_sizes(cfg)
    return None if sizes is None else megatron_layout(sizes)
