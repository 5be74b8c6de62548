"""Issue 13's multi-GPU runs: the 7B headline at 128K, CP scaling, and a 70B-shaped slice, all through the
project's `Trainer` (Megatron-Core DDP, distributed optimizer, pipeline schedules, our CP attention).
(Three benchmark modes sharing their setup and JSON writer in one CLI, hence its length.)

    torchrun --nproc-per-node 8 tools/bench_multi_gpu.py headline                       # layout from the planner
    torchrun --nproc-per-node 8 tools/bench_multi_gpu.py headline --layout tp8-cp1 --recompute full
    torchrun --nproc-per-node 8 tools/bench_multi_gpu.py cp_scaling --seq-lengths 131072 --cp-sizes 1 2 4 8
    torchrun --nproc-per-node 8 tools/bench_multi_gpu.py slice70b --layout tp8-cp1 --layers 2 4
    torchrun --nproc-per-node 2 tools/bench_multi_gpu.py headline --tiny --layout tp1-cp2  # CPU (gloo), seconds

Modes (each writes one JSON under benchmarks/results/ with device, date, versions, `gpus` and every figure,
rewritten after each measurement so a run cut short keeps what it measured, and prints a table on rank 0):

- `headline` (run 1): Llama-2-7B shape (32 layers, middle 11 `F`, random bf16 weights) at 128K, LongGen and
  the same model all-full in one process, same layout: step time (slowest rank, median of `--steps` after
  `--warmup`), tokens/s/GPU, executed and dense-equivalent MFU, peak memory (max over ranks), speedup.
  The layout comes from `--layout` or, with `--layout planner` (default), from `megatron_longgen.launch`
  (`tools/plan_parallelism.py`'s planner), planned for the full model, the heavier of the two, so that
  both run the same layout; the planner's predictions are stored next to the measurements.
  -> `multi_gpu_7b_128k_<device>.json`.
- `cp_scaling` (run 2): for each sequence length and CP size c (TP = world / c unless `--tp`), the train step of
  the 7B LongGen model (and with `--models longgen full` the baseline), then each layer type's attention alone
  (`tools/bench_context_parallel.py`'s `bench_layer`: ring attention for F, the KV-reduced exchange for S) with
  one GPU's heads (N/TP), over CP groups laid out like Megatron's (ranks TP apart, all groups at once), against
  the same GPU alone at the whole sequence (CP = 1): time, CP efficiency t1 / (c * tc), and bytes moved per rank
  per layer (forward) next to a K/V all-gather's. -> `multi_gpu_cp_scaling_<device>.json`.
- `slice70b` (run 4): Llama-2-70B layers (d 8192, 64/8 heads, ffn 28672), `--layers` (e.g. 2 and 4) of one
  kind at a time at 128K under `--layout` (default tp8, CP from the planner when available): step time and
  peak memory per run, per layer of each type from the difference between depths, and the planner's prediction
  for each run. -> `multi_gpu_70b_slice_<device>.json`.

`--tiny` swaps the models for small ones (widths 64, 256-512 tokens) so that a CPU test runs every mode on 2-8
gloo ranks; `--peak-tflops` gives MFU a peak where the GPU table has none (CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
TARGETS = {
    "speedup_min": 1.7,
    "full_mfu_min": 0.40,
    "sparse_bytes_fraction_max": 0.05,
    "sparse_cp8_efficiency_min": 0.8,
}


# ----------------------------------------------------------------------------------------- layouts
@dataclasses.dataclass(frozen=True, kw_only=True)
class RunLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    recompute: str = "full"
    micro_batch_size: int = 1
    source: str = "command line"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"sequence_parallel": self.tp > 1, "distributed_optimizer": True}


def parse_layout(text: str, *, world: int, recompute: str) -> RunLayout:
    """`tp8-cp1`, `tp2-pp2-cp2-dp1`, ... (missing sizes are 1, DP is what the world leaves; a `dpN` given
    must match) -> RunLayout. ValueError naming the numbers otherwise."""
    sizes = {"tp": 1, "pp": 1, "cp": 1}
    dp = None
    for part in text.lower().split("-"):
        key, value = part[:2], part[2:]
        if key not in ("tp", "pp", "cp", "dp") or not value.isdigit() or int(value) < 1:
            raise ValueError(f"layout {text!r}: parts look like tp8, pp2, cp2, dp1 (got {part!r})")
        if key == "dp":
            dp = int(value)
        else:
            sizes[key] = int(value)
    model_parallel = sizes["tp"] * sizes["pp"] * sizes["cp"]
    if world % model_parallel:
        raise ValueError(
            f"layout {text!r}: world size {world} is not a multiple of tp*pp*cp = {model_parallel}"
        )
    if dp is not None and dp * model_parallel != world:
        raise ValueError(
            f"layout {text!r}: tp*pp*cp*dp = {dp * model_parallel} but the world has {world} ranks"
        )
    return RunLayout(**sizes, dp=world // model_parallel, recompute=recompute)


def _planner():
    """The launch planner's functions, or None while `megatron_longgen.launch` is not installed."""
    try:
        from megatron_longgen.launch.gpus import detect_gpu, get_gpu
        from megatron_longgen.launch.layout import Layout
        from megatron_longgen.launch.plan import evaluate_layout, plan, recommend
    except ImportError:
        return None
    return {
        "plan": plan,
        "recommend": recommend,
        "evaluate": evaluate_layout,
        "Layout": Layout,
        "detect_gpu": detect_gpu,
        "get_gpu": get_gpu,
    }


def _planner_gpu(planner, name: str | None):
    gpu = planner["get_gpu"](name) if name else planner["detect_gpu"]()
    if gpu is None:
        raise ValueError("the planner needs a GPU spec: run on a known GPU or pass --planner-gpu (e.g. h200)")
    return gpu


def planned_layout(cfg, *, world: int, gpu_name: str | None) -> RunLayout:
    """The planner's recommendation for `cfg` on `world` GPUs (ValueError when it has none or is absent)."""
    planner = _planner()
    if planner is None:
        raise ValueError(
            "--layout planner needs megatron_longgen.launch (tools/plan_parallelism.py); pass an "
            "explicit layout instead, e.g. --layout tp8-cp1"
        )
    rows = planner["plan"](cfg, world_size=world, gpu=_planner_gpu(planner, gpu_name))
    best = planner["recommend"](rows)
    if best is None:
        raise ValueError(f"the planner finds no layout of {cfg.name} that fits {world} GPUs")
    lay = best.layout
    if lay.vpp > 1 or not lay.distributed_optimizer:
        raise ValueError(
            f"the planner picked {lay.describe()}; this tool runs plain 1F1B with the distributed "
            "optimizer: pass --layout"
        )
    return RunLayout(
        tp=lay.tp,
        pp=lay.pp,
        cp=lay.cp,
        dp=lay.dp,
        recompute=lay.recompute,
        micro_batch_size=lay.micro_batch_size,
        source="planner",
    )


def choose_layout(args, cfg, *, world: int, planner_world: int | None = None) -> RunLayout:
    """`--layout`: explicit (`tp8-cp1`), `planner`, or `auto` (the planner when it is importable and knows
    the GPU, else TP = the largest divisor of the world up to 8 that the KV heads allow, CP the rest).
    With `planner_world` the planner plans `cfg` on that many GPUs and its TP, CP and recompute are kept
    (DP absorbs the rest of this world): run 4 measures a slice of a run too large for this host."""
    text = args.layout
    if text == "auto":
        known = _planner() is not None and (args.planner_gpu or _device().type == "cuda")
        text = "planner" if known and not args.tiny else None
    if text is None:
        tp = max(t for t in range(1, min(world, 8) + 1) if world % t == 0 and cfg.model.kv_heads % t == 0)
        return parse_layout(f"tp{tp}-cp{world // tp}", world=world, recompute=args.recompute)
    if text != "planner":
        return parse_layout(text, world=world, recompute=args.recompute)
    planned = planned_layout(cfg, world=planner_world or world, gpu_name=args.planner_gpu)
    if planner_world is None:
        return planned
    if world % (planned.tp * planned.cp):
        raise ValueError(
            f"the planner's TP{planned.tp} x CP{planned.cp} for {planner_world} GPUs does not divide "
            f"this world of {world}"
        )
    return dataclasses.replace(planned, pp=1, dp=world // (planned.tp * planned.cp), source="planner (slice)")


def planner_prediction(cfg, layout: RunLayout, *, gpu_name: str | None) -> dict | None:
    """The planner's memory and step-time prediction for `cfg` under `layout` (None without the planner)."""
    planner = _planner()
    if planner is None:
        return None
    try:
        gpu = _planner_gpu(planner, gpu_name)
        lay = planner["Layout"](
            tp=layout.tp,
            pp=layout.pp,
            cp=layout.cp,
            dp=layout.dp,
            recompute=layout.recompute,
            micro_batch_size=layout.micro_batch_size,
        )
        row = planner["evaluate"](cfg, lay, gpu)
    except ValueError as err:
        return {"error": str(err)}
    return {
        "gpu": gpu.name,
        "step_time_s": row.step.total,
        "peak_mem_gib": row.peak_bytes / 2**30,
        "tokens_per_s_per_gpu": row.tokens_per_s_per_gpu,
        "mfu": row.mfu,
        "mfu_dense_equiv": row.mfu_dense_equiv,
    }


# ----------------------------------------------------------------------------------------- configs
def tiny_overrides(kind: str) -> list[str]:
    """Small stand-ins for the 7B / 70B shapes (MHA for 7B, 4:1 GQA like 70B's 64/8)."""
    common = [
        "model.hidden_size=64",
        "train.seq_length=512",
        "sparse.block_size=16",
        "sparse.num_window_blocks=4",
        "sparse.stride_blocks=8",
        "sparse.num_local_blocks=2",
        "sparse.backend=auto",
    ]
    if kind == "7b":
        return common + [
            "model.num_layers=6",
            "model.layer_pattern=SSFFSS",
            "model.num_attention_heads=4",
            "model.num_query_groups=4",
            "model.ffn_hidden_size=176",
        ]
    return common + [
        "model.num_attention_heads=8",
        "model.num_query_groups=2",
        "model.ffn_hidden_size=224",
        "train.seq_length=256",
    ]


def model_config(
    kind: str,
    *,
    tiny: bool,
    seq_len: int | None,
    pattern: str | None = None,
    variant: str | None = None,
    backend: str | None = None,
):
    """The 7B (`kind="7b"`) or 70B recipe, shrunk with `tiny`, at `seq_len`, with `pattern` if given."""
    from megatron_longgen.config import apply_overrides
    from megatron_longgen.recipes import llama2_7b_128k, llama2_70b_128k

    cfg = llama2_7b_128k() if kind == "7b" else llama2_70b_128k()
    # The recipes' own layouts (TP8, and PP4 x CP2 for 70B) are replaced by `with_layout`; random weights
    # and the shipped corpus and tokenizer stand in for the production inputs (throughput does not depend on them).
    extra = [
        "parallel.tensor_parallel=1",
        "parallel.pipeline_parallel=1",
        "parallel.context_parallel=1",
        "parallel.sequence_parallel=false",
        "train.init_checkpoint=None",
        "data.corpus=builtin:tiny_stories",
        "data.tokenizer=builtin:tiny_sp",
        "data.blend=",
    ]
    extra += tiny_overrides(kind) if tiny else []
    if seq_len:
        extra.append(f"train.seq_length={seq_len}")
    if pattern:
        extra += [f"model.num_layers={len(pattern)}", f"model.layer_pattern={pattern}"]
    if variant:
        extra.append(f"sparse.variant={variant}")
    if backend:
        extra.append(f"sparse.backend={backend}")
    return apply_overrides(cfg, extra)


def with_layout(cfg, layout: RunLayout, *, microbatches: int | None = None):
    """`cfg` under `layout`: distributed optimizer, sequence parallelism with TP, one micro-batch per DP rank
    (`microbatches` per DP rank; default 1, or 2*PP so that the pipeline fills), no evaluation or checkpoints."""
    from megatron_longgen.config import apply_overrides

    m = microbatches or (1 if layout.pp == 1 else 2 * layout.pp)
    return apply_overrides(
        cfg,
        [
            f"parallel.tensor_parallel={layout.tp}",
            f"parallel.pipeline_parallel={layout.pp}",
            f"parallel.context_parallel={layout.cp}",
            f"parallel.sequence_parallel={layout.tp > 1}",
            "parallel.use_distributed_optimizer=true",
            f"train.recompute={layout.recompute}",
            f"train.micro_batch_size={layout.micro_batch_size}",
            f"train.global_batch_size={layout.micro_batch_size * layout.dp * m}",
            "train.lr_warmup_steps=0",
            "train.save_on_exit=false",
            "train.eval_interval=0",
            "data.valid_fraction=0.0",
        ],
    )


# ----------------------------------------------------------------------------------------- measuring
def _device():
    import torch

    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _max_over_ranks(values: list[float], *, group=None) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _peak_memory_gib() -> float:
    """Peak GPU memory allocated by this rank; on CPU the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_trainer(cfg, *, warmup: int, steps: int, peak_tflops: float | None) -> dict:
    """Collective: build a Trainer for `cfg`, run `warmup` + `steps` optimizer steps; the step time is the
    slowest rank's per step, then the median over the timed steps; peak memory the largest rank's."""
    import torch

    from megatron_longgen.training.flops import peak_tflops_for_device, throughput_metrics
    from megatron_longgen.training.trainer import Trainer

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=warmup + steps))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:  # nothing is written: no checkpoints, no fit()
        trainer = Trainer(cfg, run_dir=run_dir, quiet=True)
        times, losses = [], []
        for step in range(warmup + steps):
            _sync()
            start = time.perf_counter()
            metrics = trainer.train_step(step)
            _sync()
            times.append(time.perf_counter() - start)
            losses.append(metrics["loss"])
        world = trainer.world_size
        backends = {
            getattr(m, "kind", "?"): m.resolved.name
            for chunk in trainer.model
            for m in chunk.modules()
            if getattr(m, "resolved", None) is not None
        }
        logging_rank_losses = losses if trainer.is_logging_rank else [float("-inf")] * len(losses)
        del trainer
    gc.collect()
    times = _max_over_ranks(times)[warmup:]
    losses = _max_over_ranks(logging_rank_losses)  # only the metrics rank holds the real loss
    peak_mem = _max_over_ranks([_peak_memory_gib()])[0]
    step_time = statistics.median(times)
    if peak_tflops is None and torch.cuda.is_available():
        peak_tflops = peak_tflops_for_device(torch.cuda.get_device_name())
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    return {
        "pattern": cfg.model.layer_pattern,
        "seq_length": cfg.train.seq_length,
        "global_batch_size": cfg.train.global_batch_size,
        "step_time_s": step_time,
        "step_times_s": times,
        "tokens_per_s": tokens / step_time,
        "tokens_per_s_per_gpu": tokens / step_time / world,
        "peak_mem_gib": peak_mem,
        "losses": losses,
        "attention_backends": backends,
        **throughput_metrics(cfg=cfg, step_time_s=step_time, num_gpus=world, peak_tflops=peak_tflops),
    }


def _load_bench_context_parallel():
    """`tools/bench_context_parallel.py` as a module (tools/ is not a package)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import bench_context_parallel

    return bench_context_parallel


def cp_groups(*, world: int, tp: int, cp: int) -> list[list[int]]:
    """CP groups as Megatron lays them out for tp x cp x dp (order tp-cp-dp): ranks `tp` apart, the groups of
    all TP positions and DP replicas side by side. Every rank is in exactly one group."""
    groups = []
    for base in range(0, world, tp * cp):
        for t in range(tp):
            groups.append([base + t + tp * j for j in range(cp)])
    return groups


def attention_scaling(cfg, *, cp: int, tp: int, iters: int, ring_kernel: str, sparse_kernel: str) -> dict:
    """Collective over the world: each layer type's attention (fwd + bwd, one GPU's heads) over CP groups of
    size `cp` and alone at the whole sequence; times are the slowest rank's (ms), bytes per rank per layer."""
    import types

    import torch.distributed as dist

    from megatron_longgen.attention.masks import pattern_from_config

    bcp = _load_bench_context_parallel()
    bcp._DEVICE[0] = _device()  # the device its timer reduces on; set by its own main() otherwise
    world, rank = dist.get_world_size(), dist.get_rank()
    m, seq = cfg.model, cfg.train.seq_length
    args = types.SimpleNamespace(
        batch=1,
        heads=m.num_attention_heads // tp,
        kv_heads=m.kv_heads // tp,
        head_dim=m.head_dim,
        iters=iters,
        sparse_iters=iters,
    )
    mine = None
    for members in cp_groups(world=world, tp=tp, cp=cp):
        group = dist.new_group(members)  # collective: every rank creates every group
        if rank in members:
            mine = group
    solo = [dist.new_group([r]) for r in range(world)][rank]
    pattern = pattern_from_config(cfg.sparse)
    out = {}
    for kind, pat, kernel in (("F", None, ring_kernel), ("S", pattern, sparse_kernel)):
        name = "full" if kind == "F" else "sparse"
        t1 = bcp.bench_layer(name, pat, group=solo, seq_len=seq, args=args, kernel=kernel, device=_device())
        dist.barrier()
        tc = bcp.bench_layer(name, pat, group=mine, seq_len=seq, args=args, kernel=kernel, device=_device())
        t1, tc = _max_over_ranks([t1, tc])
        out[kind] = {
            "kernel": kernel,
            "cp1_ms": t1,
            "cp_ms": tc,
            "ratio": tc / t1,
            "efficiency": t1 / (cp * tc),
        }
    out.update(exchange_bytes(cfg, cp=cp, kv_heads=args.kv_heads))
    return out


def exchange_bytes(cfg, *, cp: int, kv_heads: int) -> dict:
    """Forward bytes one rank receives per layer under CP (bf16 K/V, batch 1): the ring's cp - 1 hops of the
    local K/V for F layers, the exchange plan's fetched blocks for S layers (the busiest rank), and what an
    all-gather of K/V would receive. The backward moves K/V again plus dK/dV (fp32 in the ring)."""
    if cp == 1:
        return {"bytes": {"F": 0, "S": 0, "allgather": 0, "S_fraction_of_allgather": 0.0}}
    try:
        from megatron_longgen.context_parallel.exchange_plan import plan_sparse_exchange
    except ImportError:  # before the exchange plan got its own module
        from megatron_longgen.context_parallel.sparse_exchange import plan_sparse_exchange
    from megatron_longgen.attention.masks import pattern_from_config

    m, seq, elem = cfg.model, cfg.train.seq_length, 2
    kv_shard = 2 * kv_heads * (seq // cp) * m.head_dim * elem
    pattern = pattern_from_config(cfg.sparse)
    received = max(
        plan_sparse_exchange(pattern, cp_rank=r, cp_size=cp, seq_len=seq).forward_bytes(
            batch=1, kv_heads=kv_heads, head_dim=m.head_dim, element_size=elem
        )["received"]
        for r in range(cp)
    )
    allgather = (cp - 1) * kv_shard
    return {
        "bytes": {
            "F": allgather,
            "S": received,
            "allgather": allgather,
            "S_fraction_of_allgather": received / allgather,
        }
    }


# ----------------------------------------------------------------------------------------- modes
def mode_headline(args, *, world: int) -> Iterator[dict]:
    from megatron_longgen.recipes import with_full_attention

    longgen = model_config(
        "7b", tiny=args.tiny, seq_len=args.seq_len, variant=args.sparse_variant, backend=args.backend
    )
    full = with_full_attention(longgen)
    layout = choose_layout(args, full, world=world)
    result = {
        "layout": layout.as_dict(),
        "targets": {k: TARGETS[k] for k in ("speedup_min", "full_mfu_min")},
        "planner_prediction": {},
    }
    for name, cfg in (("longgen", longgen), ("full", full)):
        cfg = with_layout(cfg, layout, microbatches=args.microbatches)
        result["layout"]["global_batch_size"] = cfg.train.global_batch_size
        result["planner_prediction"][name] = planner_prediction(cfg, layout, gpu_name=args.planner_gpu)
        result[name] = run_trainer(cfg, warmup=args.warmup, steps=args.steps, peak_tflops=args.peak_tflops)
        yield result
    result["speedup"] = result["longgen"]["tokens_per_s"] / result["full"]["tokens_per_s"]
    result["targets"]["speedup_met"] = result["speedup"] >= TARGETS["speedup_min"]
    mfu = result["full"].get("mfu")
    result["targets"]["full_mfu_met"] = None if mfu is None else mfu >= TARGETS["full_mfu_min"]
    yield result


def mode_cp_scaling(args, *, world: int) -> Iterator[dict]:
    from megatron_longgen.recipes import with_full_attention

    result = {
        "targets": {k: TARGETS[k] for k in ("sparse_bytes_fraction_max", "sparse_cp8_efficiency_min")},
        "rows": [],
    }
    cuda = _device().type == "cuda"
    ring_kernel = args.ring_kernel or ("cudnn" if cuda else "math")
    sparse_kernel = args.sparse_cp_kernel or ("flex" if cuda else "torch")
    for seq in args.seq_lengths or ([512] if args.tiny else [131072, 262144]):
        longgen = model_config(
            "7b", tiny=args.tiny, seq_len=seq, variant=args.sparse_variant, backend=args.backend
        )
        models = {"longgen": longgen, "full": with_full_attention(longgen)}
        for cp in args.cp_sizes or [c for c in (1, 2, 4, 8) if world % c == 0]:
            tp = args.tp or world // cp
            layout = parse_layout(f"tp{tp}-cp{cp}", world=world, recompute=args.recompute)
            row = {"seq_length": seq, "layout": layout.as_dict(), "train_step": {}}
            result["rows"].append(row)
            for name in args.models:
                row["train_step"][name] = run_trainer(
                    with_layout(models[name], layout),
                    warmup=args.warmup,
                    steps=args.steps,
                    peak_tflops=args.peak_tflops,
                )
                yield result
            row["attention"] = attention_scaling(
                longgen,
                cp=cp,
                tp=tp,
                iters=args.attention_iters,
                ring_kernel=ring_kernel,
                sparse_kernel=sparse_kernel,
            )
            yield result


def mode_slice70b(args, *, world: int) -> Iterator[dict]:
    whole = model_config(
        "70b", tiny=args.tiny, seq_len=args.seq_len, variant=args.sparse_variant, backend=args.backend
    )
    layout = choose_layout(args, whole, world=world, planner_world=args.planner_world)
    result = {"layout": layout.as_dict(), "runs": [], "per_layer": {}}
    for kind in args.kinds:
        for depth in args.layers:
            cfg = with_layout(
                model_config(
                    "70b",
                    tiny=args.tiny,
                    seq_len=args.seq_len,
                    pattern=kind * depth,
                    variant=args.sparse_variant,
                    backend=args.backend,
                ),
                layout,
            )
            run = run_trainer(cfg, warmup=args.warmup, steps=args.steps, peak_tflops=args.peak_tflops)
            run.update(
                kind=kind,
                layers=depth,
                planner_prediction=planner_prediction(cfg, layout, gpu_name=args.planner_gpu),
            )
            result["runs"].append(run)
            yield result
        result["per_layer"][kind] = per_layer(result["runs"], kind=kind)
        yield result


def per_layer(runs: list[dict], *, kind: str) -> dict | None:
    """Per-layer step time and memory of `kind` from the shallowest and deepest runs (a straight line through
    two depths: what one more layer adds), and the rest (embedding, output layer, optimizer) as the intercept;
    the planner's figures the same way when it predicted both runs."""
    rows = sorted((r for r in runs if r["kind"] == kind), key=lambda r: r["layers"])
    if len(rows) < 2 or rows[0]["layers"] == rows[-1]["layers"]:
        return None
    a, b = rows[0], rows[-1]
    dl = b["layers"] - a["layers"]

    def line(key, source_a, source_b):
        slope = (source_b[key] - source_a[key]) / dl
        return slope, source_a[key] - slope * a["layers"]

    out = {}
    for key in ("step_time_s", "peak_mem_gib"):
        slope, rest = line(key, a, b)
        out[key] = {"per_layer": slope, "rest": rest}
        pa, pb = a.get("planner_prediction") or {}, b.get("planner_prediction") or {}
        if key in pa and key in pb:
            p_slope, p_rest = line(key, pa, pb)
            out[key].update(
                predicted_per_layer=p_slope,
                predicted_rest=p_rest,
                measured_over_predicted=slope / p_slope if p_slope else None,
            )
    return out


# ----------------------------------------------------------------------------------------- CLI
MODES = {
    "headline": (mode_headline, "multi_gpu_7b_128k"),
    "cp_scaling": (mode_cp_scaling, "multi_gpu_cp_scaling"),
    "slice70b": (mode_slice70b, "multi_gpu_70b_slice"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--tiny", action="store_true", help="small models for CPU/gloo tests")
    p.add_argument(
        "--layout",
        default=None,
        help="tp8-cp1 / tp2-pp2-cp2 / planner / auto (default: auto for "
        "headline, tp8-cp1 for slice70b, auto with --tiny)",
    )
    p.add_argument(
        "--recompute",
        default="full",
        choices=("none", "selective", "full"),
        help="with an explicit layout (the planner picks its own)",
    )
    p.add_argument("--planner-gpu", default=None, help="GPU spec for the planner (default: this GPU)")
    p.add_argument(
        "--planner-world", type=int, default=64, help="slice70b --layout planner: GPUs of the real run"
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="headline / slice70b (default: the recipe's 131072)"
    )
    p.add_argument(
        "--seq-lengths", type=int, nargs="+", default=None, help="cp_scaling (default 131072 262144)"
    )
    p.add_argument(
        "--cp-sizes", type=int, nargs="+", default=None, help="cp_scaling (default 1 2 4 8 that divide)"
    )
    p.add_argument("--tp", type=int, default=None, help="cp_scaling: fixed TP (default world / CP)")
    p.add_argument(
        "--models",
        nargs="+",
        default=["longgen"],
        choices=("longgen", "full"),
        help="cp_scaling: which models' train steps to time",
    )
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="slice70b depths")
    p.add_argument("--kinds", nargs="+", default=["S", "F"], choices=("S", "F"), help="slice70b layer kinds")
    p.add_argument("--microbatches", type=int, default=None, help="per DP rank (default 1, or 2*PP)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attention-iters", type=int, default=3, help="cp_scaling attention timings")
    p.add_argument(
        "--ring-kernel", default=None, help="cp_scaling: ring step kernel (default cudnn; math on CPU)"
    )
    p.add_argument(
        "--sparse-cp-kernel", default=None, help="cp_scaling: sparse CP kernel (default flex; torch on CPU)"
    )
    p.add_argument("--sparse-variant", default=None, choices=("sink_window", "block_strided"))
    p.add_argument("--backend", default=None, help="sparse kernel backend of the trained models")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for MFU (CPU)")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/<mode file>_<device>.json)"
    )
    return p


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_result(mode: str, result: dict) -> str:
    """The table `main` prints for a mode's final result."""
    lines = []
    if mode == "headline":
        lines.append(
            f"{'model':<9}{'pattern':<34}{'step s':>8}{'tok/s/GPU':>11}{'MFU':>7}{'MFU dense':>10}"
            f"{'mem GiB':>9}{'pred tok/s/GPU':>15}{'pred GiB':>9}"
        )
        for name in ("longgen", "full"):
            r, pred = result.get(name), (result.get("planner_prediction") or {}).get(name) or {}
            if r:
                lines.append(
                    f"{name:<9}{r['pattern']:<34}{r['step_time_s']:>8.2f}{r['tokens_per_s_per_gpu']:>11.0f}"
                    f"{_fmt(r.get('mfu'), '.3f'):>7}{_fmt(r.get('mfu_dense_equiv'), '.3f'):>10}"
                    f"{r['peak_mem_gib']:>9.1f}{_fmt(pred.get('tokens_per_s_per_gpu'), '.0f'):>15}"
                    f"{_fmt(pred.get('peak_mem_gib'), '.1f'):>9}"
                )
        if "speedup" in result:
            lines.append(
                f"speedup (LongGen tokens/s over full) {result['speedup']:.3f}, target >= "
                f"{TARGETS['speedup_min']}; full MFU target >= {TARGETS['full_mfu_min']}"
            )
    elif mode == "cp_scaling":
        lines.append(
            f"{'seq':>8}{'TP':>4}{'CP':>4}{'step s':>8}{'F cp1 ms':>10}{'F ms':>9}{'F eff':>7}"
            f"{'S cp1 ms':>10}{'S ms':>9}{'S eff':>7}{'S bytes/AG':>11}"
        )
        for row in result["rows"]:
            att, lay = row.get("attention", {}), row["layout"]
            step = (row["train_step"].get("longgen") or next(iter(row["train_step"].values()), {})).get(
                "step_time_s"
            )
            f, s = att.get("F", {}), att.get("S", {})
            frac = att.get("bytes", {}).get("S_fraction_of_allgather")
            lines.append(
                f"{row['seq_length']:>8}{lay['tp']:>4}{lay['cp']:>4}{_fmt(step, '.2f'):>8}"
                f"{_fmt(f.get('cp1_ms'), '.1f'):>10}{_fmt(f.get('cp_ms'), '.1f'):>9}"
                f"{_fmt(f.get('efficiency'), '.2f'):>7}{_fmt(s.get('cp1_ms'), '.1f'):>10}"
                f"{_fmt(s.get('cp_ms'), '.1f'):>9}{_fmt(s.get('efficiency'), '.2f'):>7}{_fmt(frac, '.4f'):>11}"
            )
    else:
        lines.append(f"{'kind':<5}{'layers':>7}{'step s':>8}{'mem GiB':>9}{'pred step s':>12}{'pred GiB':>9}")
        for r in result["runs"]:
            pred = r.get("planner_prediction") or {}
            lines.append(
                f"{r['kind']:<5}{r['layers']:>7}{r['step_time_s']:>8.2f}{r['peak_mem_gib']:>9.1f}"
                f"{_fmt(pred.get('step_time_s'), '.2f'):>12}{_fmt(pred.get('peak_mem_gib'), '.1f'):>9}"
            )
        for kind, fit in result["per_layer"].items():
            if fit:
                t, m = fit["step_time_s"], fit["peak_mem_gib"]
                lines.append(
                    f"per {kind} layer: {t['per_layer']:.3f} s (predicted {_fmt(t.get('predicted_per_layer'), '.3f')}),"
                    f" {m['per_layer']:.2f} GiB (predicted {_fmt(m.get('predicted_per_layer'), '.2f')})"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.layout is None:
        args.layout = "tp8-cp1" if args.mode == "slice70b" and not args.tiny else "auto"
    import torch
    import torch.distributed as dist

    from megatron_longgen.utils.distributed import destroy, init_distributed

    if not torch.cuda.is_available() and not args.tiny:
        print("bench_multi_gpu: needs CUDA GPUs (or --tiny for a CPU/gloo run)", file=sys.stderr)
        return 2
    created = not dist.is_initialized()
    rank, world = init_distributed()
    fn, stem = MODES[args.mode]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    slug = device.split()[-1].lower() if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"benchmarks/results/{stem}_{slug}.json")
    from importlib.metadata import PackageNotFoundError, version

    try:
        megatron_version = version("megatron-core")
    except PackageNotFoundError:
        megatron_version = None
    header = {
        "mode": args.mode,
        "device": device,
        "gpus": world,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "megatron_core": megatron_version,
            "python": sys.version.split()[0],
        },
        "tiny": args.tiny,
        "steps": args.steps,
        "warmup": args.warmup,
        "args": vars(args),
    }
    result: dict = {}
    try:
        for result in fn(args, world=world):
            if rank == 0:
                write_json_atomic(out, header | result)
    finally:
        if created:
            destroy()
    if rank == 0:
        print(f"{args.mode}: {device} x {world}" + (" (tiny models)" if args.tiny else ""))
        print(format_result(args.mode, result))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
