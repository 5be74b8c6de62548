"""The parallelism planner: every TP x PP x CP x DP x recompute x micro-batch layout of a config on N GPUs,
with its per-GPU memory (`memory.py`) and step time (`timing.py`), ranked.

Ranking: layouts that fit first, then by predicted tokens/s per GPU, then by memory headroom. "Fits"
means the busiest GPU's predicted peak of allocated memory stays within `GpuSpec.usable_bytes` (total
minus CUDA context / NCCL / workspaces, minus a fragmentation margin); the memory model's accuracy on the
H200 bench is stated in `benchmarks/results/planner_validation_h200.md`.

Candidates: TP in the divisors of the GPUs per node that the heads allow (query heads divisible, KV heads
divisible by TP or TP by KV heads), sequence parallelism whenever TP > 1, CP where the sequence splits into
2*cp*block_size chunks, any PP up to the layer count, DP what is left (the global batch must divide into
micro-batch x DP), micro-batches of 1, 2 or 4 sequences, plain 1F1B (the interleaved schedule is modelled
when a config asks for it, not enumerated), the distributed optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longgen.config import LongGenConfig
from megatron_longgen.launch.gpus import GIB, GpuSpec
from megatron_longgen.launch.layout import RECOMPUTE_MODES, Layout, apply_layout, num_microbatches
from megatron_longgen.launch.memory import MemoryPlan, estimate_memory, model_parameters
from megatron_longgen.launch.timing import StepTime, estimate_step_time


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    """One candidate layout with its predictions."""

    layout: Layout
    memory: MemoryPlan
    step: StepTime
    usable_bytes: float
    tokens_per_s_per_gpu: float
    mfu: float
    """Executed model FLOPs / (step time * GPUs * peak): sparse layers count only their attended pairs."""
    mfu_dense_equiv: float
    """The same with every layer counted as full attention (the `_full` baseline's work)."""
    checkpoint_save_s: float

    @property
    def peak_bytes(self) -> float:
        return self.memory.peak_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def fits_within(self, headroom: float) -> bool:
        """Fits with `headroom` (a share of the usable memory) left free."""
        return self.peak_bytes <= (1.0 - headroom) * self.usable_bytes


@dataclass(frozen=True, kw_only=True)
class CheckpointEstimate:
    total_bytes: float
    busiest_gpu_bytes: float
    save_s: float


def checkpoint_save_estimate(
    cfg: LongGenConfig, layout: Layout, *, fs_write_gbps: float, per_gpu_write_gbps: float = 2.0
) -> CheckpointEstimate:
    """Bytes and seconds of one training checkpoint: bf16 weights (written once, by the DP-rank-0 replica of
    each shard) + fp32 main params and Adam moments (every rank its optimizer shard). The save takes the
    longer of: everything over the file system's aggregate write bandwidth available to the job
    (`fs_write_gbps`, GB/s), and the busiest GPU's bytes at one writer's rate (`per_gpu_write_gbps`,
    ~2 GB/s for a process writing through a node's storage link shared by 8 GPUs)."""
    if fs_write_gbps <= 0 or per_gpu_write_gbps <= 0:
        raise ValueError(
            f"file-system write bandwidths must be > 0 GB/s, got {fs_write_gbps} and {per_gpu_write_gbps}"
        )
    params = model_parameters(cfg.model, tp=layout.tp)["total"]
    a = 4 if cfg.train.dtype == "fp32" else 2
    opt = 12 if a == 2 else 8
    total = (a + opt) * params
    model_shard = a * params / (layout.tp * layout.pp)
    opt_shard = (
        opt
        * params
        / (layout.tp * layout.pp * (layout.dp * layout.cp if layout.distributed_optimizer else 1))
    )
    busiest = model_shard + opt_shard
    return CheckpointEstimate(
        total_bytes=total,
        busiest_gpu_bytes=busiest,
        save_s=max(total / (fs_write_gbps * 1e9), busiest / (per_gpu_write_gbps * 1e9)),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    cfg: LongGenConfig,
    *,
    world_size: int,
    gpus_per_node: int,
    recompute_modes: tuple[str, ...] = RECOMPUTE_MODES,
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4),
) -> list[Layout]:
    """Every layout the config accepts on `world_size` GPUs (module docstring)."""
    if world_size < 1 or gpus_per_node < 1:
        raise ValueError(f"need world_size >= 1 and gpus_per_node >= 1, got {world_size} and {gpus_per_node}")
    layouts = []
    for tp in _divisors(min(gpus_per_node, world_size)):
        for cp in _divisors(world_size // tp):
            for pp in _divisors(world_size // (tp * cp)):
                if pp > cfg.model.num_layers:
                    continue
                dp = world_size // (tp * cp * pp)
                for mbs in micro_batch_sizes:
                    if cfg.train.global_batch_size % (mbs * dp):
                        continue
                    for mode in recompute_modes:
                        layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp, recompute=mode, micro_batch_size=mbs)
                        try:
                            apply_layout(cfg, layout)  # heads vs TP, GQA groups, seq vs 2*cp*block, ...
                        except ValueError:
                            continue
                        layouts.append(layout)
    return layouts


def evaluate_layout(
    cfg: LongGenConfig, layout: Layout, gpu: GpuSpec, *, gpus_per_node: int = 8, fs_write_gbps: float = 10.0
) -> PlanRow:
    """Memory, step time, throughput and MFU of one layout (ValueError when the layout is invalid)."""
    from megatron_longgen.training.flops import training_flops_per_step

    run = apply_layout(cfg, layout)
    num_microbatches(run, layout)
    memory = estimate_memory(run, layout)
    step = estimate_step_time(run, layout, gpu, gpus_per_node=gpus_per_node)
    world = layout.world_size
    seconds = step.total
    tokens = run.train.global_batch_size * run.train.seq_length
    peak = gpu.peak_bf16_tflops * 1e12
    return PlanRow(
        layout=layout,
        memory=memory,
        step=step,
        usable_bytes=gpu.usable_bytes,
        tokens_per_s_per_gpu=tokens / seconds / world,
        mfu=training_flops_per_step(run) / seconds / world / peak,
        mfu_dense_equiv=training_flops_per_step(run, dense_equivalent=True) / seconds / world / peak,
        checkpoint_save_s=checkpoint_save_estimate(run, layout, fs_write_gbps=fs_write_gbps).save_s,
    )


def plan(
    cfg: LongGenConfig,
    *,
    world_size: int,
    gpu: GpuSpec,
    gpus_per_node: int = 8,
    recompute_modes: tuple[str, ...] = RECOMPUTE_MODES,
    fs_write_gbps: float = 10.0,
    headroom: float = 0.0,
) -> list[PlanRow]:
    """All candidate layouts of `cfg` on `world_size` GPUs, best first (module docstring); with `headroom`,
    a layout counts as fitting only when that share of the usable memory stays free."""
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    rows = [
        evaluate_layout(cfg, layout, gpu, gpus_per_node=gpus_per_node, fs_write_gbps=fs_write_gbps)
        for layout in candidate_layouts(
            cfg, world_size=world_size, gpus_per_node=gpus_per_node, recompute_modes=recompute_modes
        )
    ]
    # Tiers: fits with headroom, fits, does not fit; then faster first, then less memory.
    return sorted(
        rows,
        key=lambda r: (
            0 if r.fits_within(headroom) else 1 if r.fits else 2,
            -r.tokens_per_s_per_gpu,
            r.peak_bytes,
        ),
    )


def recommend(rows: list[PlanRow], *, headroom: float = 0.10, tie: float = 0.05) -> PlanRow | None:
    """The layout to run: among those that fit with `headroom`, the ones within `tie` of the fastest
    predicted throughput (the step-time model's error on the H200 is ~10%, so closer than that is a tie)
    go to the simplest: fewest of pipeline and context parallelism, then the fastest. None if none fits."""
    ok = [r for r in rows if r.fits_within(headroom)]
    if not ok:
        return None
    fastest = max(r.tokens_per_s_per_gpu for r in ok)
    close = [r for r in ok if r.tokens_per_s_per_gpu >= (1.0 - tie) * fastest]
    return min(close, key=lambda r: ((r.layout.pp > 1) + (r.layout.cp > 1), -r.tokens_per_s_per_gpu))


# ----------------------------------------------------------------------------------------- formatting
HEADER = (
    f"{'rank':>4}  {'layout':<22}{'recompute':<10}{'mbs':>4}{'mem GiB':>9}{'of usable':>10}{'step s':>9}"
    f"{'tok/s/GPU':>11}{'MFU':>7}{'MFU(dense)':>11}{'bubble':>8}{'comm':>7}"
)


def format_row(rank: int, row: PlanRow) -> str:
    s = row.step
    comm = (s.tp_comm + s.cp_comm + s.pp_comm + s.dp_comm) / s.total
    share = f"{row.peak_bytes / row.usable_bytes:.0%}" + ("" if row.fits else " OOM")
    return (
        f"{rank:>4}  {row.layout.short():<22}{row.layout.recompute:<10}{row.layout.micro_batch_size:>4}"
        f"{row.peak_bytes / GIB:>9.1f}{share:>10}{s.total:>9.2f}"
        f"{row.tokens_per_s_per_gpu:>11.0f}{row.mfu:>7.3f}{row.mfu_dense_equiv:>11.3f}"
        f"{s.bubble / s.total:>8.1%}{comm:>7.1%}"
    )


def describe_row(row: PlanRow) -> list[str]:
    """Breakdown lines for one layout: memory of its busiest GPU and the step-time components."""
    st = row.memory.peak
    s = row.step
    lines = [
        f"layout {row.layout.describe()}",
        (
            f"  memory (pipeline rank {st.stage}, {len(st.layers)} layers '{st.layers}'): "
            f"{st.total / GIB:.1f} GiB of {row.usable_bytes / GIB:.1f} usable = weights {st.weights / GIB:.1f} + grads "
            f"{st.grads / GIB:.1f} + optimizer {st.optimizer / GIB:.1f} + activations {st.activations / GIB:.1f} "
            f"({st.in_flight:g} micro-batch(es) in flight) + peak transient {st.working / GIB:.1f} ({st.peak_phase}; "
            f"logits {st.logits / GIB:.1f}, CP buffers {st.cp_buffers / GIB:.1f})"
        ),
        (
            f"  step {s.total:.2f} s for {s.num_microbatches} micro-batch(es): GEMM {s.gemm:.2f}, attention "
            f"{s.attention:.2f}, element-wise {s.elementwise:.2f}, recompute {s.recompute:.2f}, TP {s.tp_comm:.2f}, "
            f"CP {s.cp_comm:.2f}, PP {s.pp_comm:.2f}, bubble {s.bubble:.2f}, DP {s.dp_comm:.2f}, optimizer "
            f"{s.optimizer:.2f}"
        ),
        (
            f"  {row.tokens_per_s_per_gpu:.0f} tokens/s/GPU, MFU {row.mfu:.3f} executed / {row.mfu_dense_equiv:.3f} "
            f"dense-equivalent; checkpoint save ~{row.checkpoint_save_s:.0f} s"
        ),
    ]
    return lines
