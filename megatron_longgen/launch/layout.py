"""A parallel layout (TP x PP x CP x DP, recompute, micro-batch) and what follows from it for one config.

`Layout` is what the planner enumerates and the validator checks; `layout_from_config` reads the one a
config asks for on `world_size` GPUs, `apply_layout` writes one back into a config (the planner's
candidates are real configs, so every estimate goes through the same code as the run).

Rank placement follows Megatron-Core's default order `tp-cp-ep-dp-pp` (TP fastest): a group stays inside
a node when the product of its size and the sizes of the faster dimensions fits `gpus_per_node`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_longgen.config import LongGenConfig

RECOMPUTE_MODES: tuple[str, ...] = ("none", "selective", "full")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One way to run a config on `tp * pp * cp * dp` GPUs."""

    tp: int
    pp: int
    cp: int
    dp: int
    recompute: str
    micro_batch_size: int = 1
    vpp: int = 1
    """Virtual pipeline chunks per rank (1: plain 1F1B)."""
    sequence_parallel: bool = True
    """Megatron sequence parallelism (only meaningful with tp > 1)."""
    distributed_optimizer: bool = True

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def describe(self) -> str:
        vpp = f" vpp {self.vpp}" if self.vpp > 1 else ""
        return (
            f"tp {self.tp} pp {self.pp}{vpp} cp {self.cp} dp {self.dp}, recompute {self.recompute}, "
            f"micro-batch {self.micro_batch_size}"
        )

    def short(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}"


def layout_from_config(cfg: LongGenConfig, *, world_size: int) -> Layout:
    """The layout `cfg` asks for on `world_size` GPUs (ValueError naming the numbers when it cannot)."""
    p = cfg.parallel
    return Layout(
        tp=p.tensor_parallel,
        pp=p.pipeline_parallel,
        cp=p.context_parallel,
        dp=p.data_parallel(world_size),
        recompute=cfg.train.recompute,
        micro_batch_size=cfg.train.micro_batch_size,
        vpp=p.virtual_pipeline_parallel or 1,
        sequence_parallel=p.sequence_parallel,
        distributed_optimizer=p.use_distributed_optimizer,
    )


def apply_layout(cfg: LongGenConfig, layout: Layout) -> LongGenConfig:
    """`cfg` with `layout`'s parallel sizes, recompute mode and micro-batch (validated by the dataclasses)."""
    parallel = dataclasses.replace(
        cfg.parallel,
        tensor_parallel=layout.tp,
        pipeline_parallel=layout.pp,
        context_parallel=layout.cp,
        virtual_pipeline_parallel=layout.vpp if layout.vpp > 1 else None,
        sequence_parallel=layout.sp,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    train = dataclasses.replace(
        cfg.train, recompute=layout.recompute, micro_batch_size=layout.micro_batch_size
    )
    return dataclasses.replace(cfg, parallel=parallel, train=train)


def num_microbatches(cfg: LongGenConfig, layout: Layout) -> int:
    """Micro-batches per optimizer step on one data-parallel rank (ValueError when it does not divide)."""
    per_step = layout.micro_batch_size * layout.dp
    if cfg.train.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {cfg.train.global_batch_size} must be a multiple of micro_batch_size * dp = "
            f"{layout.micro_batch_size} * {layout.dp} on {layout.world_size} GPUs"
        )
    return cfg.train.global_batch_size // per_step


_STAGE_SIZES: dict[tuple, tuple[int, ...] | None] = {}


def _stage_sizes(cfg: LongGenConfig, layout: Layout) -> tuple[int, ...] | None:
    """`training.pipeline_layout.pipeline_stage_sizes` for `cfg` under `layout`, memoised on what it reads
    (the balancing is an O(stages * layers^2) programme and the planner asks for hundreds of layouts)."""
    from megatron_longgen.training.pipeline_layout import pipeline_stage_sizes

    key = (cfg.model, cfg.sparse, cfg.train.seq_length, cfg.train.pipeline_layout, layout.pp, layout.vpp)
    if key not in _STAGE_SIZES:
        sizes = pipeline_stage_sizes(apply_layout(cfg, layout))
        _STAGE_SIZES[key] = None if sizes is None else tuple(sizes)
    return _STAGE_SIZES[key]


def stage_layer_kinds(cfg: LongGenConfig, layout: Layout) -> list[str]:
    """The layer pattern of each pipeline rank's layers (all its virtual chunks), first rank first."""
    pattern = cfg.model.layer_pattern
    chunks = layout.pp * layout.vpp
    sizes = _stage_sizes(cfg, layout) or [len(pattern) // chunks] * chunks  # None: Megatron's even split
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    # Chunk c (model order) lives on pipeline rank c % pp.
    per_rank = ["" for _ in range(layout.pp)]
    for c, (a, b) in enumerate(bounds):
        per_rank[c % layout.pp] += pattern[a:b]
    return per_rank


def group_is_intra_node(*, inner: int, size: int, gpus_per_node: int) -> bool:
    """Whether a group of `size` ranks whose stride is `inner` (the product of the faster dimensions)
    fits inside one node."""
    return size == 1 or inner * size <= gpus_per_node


def placement(layout: Layout, *, gpus_per_node: int) -> dict[str, bool]:
    """Which groups stay inside a node (Megatron order tp-cp-dp-pp): {'tp': True, 'cp': ..., ...}.
    The gradient reduction runs over dp x cp (the distributed optimizer shards over both)."""
    return {
        "tp": group_is_intra_node(inner=1, size=layout.tp, gpus_per_node=gpus_per_node),
        "cp": group_is_intra_node(inner=layout.tp, size=layout.cp, gpus_per_node=gpus_per_node),
        "dp": group_is_intra_node(inner=layout.tp * layout.cp, size=layout.dp, gpus_per_node=gpus_per_node),
        "dp_cp": group_is_intra_node(
            inner=layout.tp, size=layout.dp * layout.cp, gpus_per_node=gpus_per_node
        ),
        "pp": group_is_intra_node(
            inner=layout.tp * layout.cp * layout.dp, size=layout.pp, gpus_per_node=gpus_per_node
        ),
    }
