"""The planner against this project's own H200 measurements: predicted vs measured, with the errors.

Sources (whatever of them exist under `benchmarks/results/`, so the table can be regenerated after new runs):
- `train_step_*h200*.json` (`tools/bench_train_step.py`): the llama2_7b_128k-shaped model with a few layers on
  one GPU (TP=PP=CP=1), LongGen pattern and all-full baseline, 32K-128K, one or several recompute modes:
  peak allocated memory (target: within 10%), step time (target: within 20%), and out-of-memory rows
  (target: the planner says it does not fit).
- `context_parallel_h200.json` (`tools/bench_context_parallel.py`): one attention layer's forward+backward at
  128K on one GPU and split over two (CP=2): the CP model's prediction of the CP=2 time from the measured
  CP=1 time (the work splits evenly, ring hops overlap the step kernels, the sparse halo does not), and the
  GPU table's kernel rates against the measured CP=1 time where the table has that kernel.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path

from megatron_longgen.config import LongGenConfig
from megatron_longgen.launch.validate import LaunchPolicy

MEMORY_TOLERANCE = 0.10
TIME_TOLERANCE = 0.20


def bench_model_config(
    *, pattern: str, seq_length: int, recompute: str, variant: str, backend: str
) -> LongGenConfig:
    """The config `tools/bench_train_step.py` trains: llama2_7b_128k's shape with `len(pattern)` layers on one
    GPU (TP=PP=CP=1, micro/global batch 1, distributed optimizer), the shipped corpus and tokenizer."""
    from megatron_longgen.config import apply_overrides
    from megatron_longgen.recipes import llama2_7b_128k

    base = llama2_7b_128k()
    model = dataclasses.replace(base.model, num_layers=len(pattern), layer_pattern=pattern)
    cfg = dataclasses.replace(base, name=f"bench_{pattern}_{seq_length}", model=model)
    return apply_overrides(
        cfg,
        [
            "parallel.sequence_parallel=false",
            "parallel.tensor_parallel=1",
            "parallel.use_distributed_optimizer=true",
            f"train.seq_length={seq_length}",
            "train.micro_batch_size=1",
            "train.global_batch_size=1",
            f"train.recompute={recompute}",
            "train.save_on_exit=false",
            "train.lr_warmup_steps=0",
            "train.init_checkpoint=None",
            "data.corpus=builtin:tiny_stories",
            "data.tokenizer=builtin:tiny_sp",
            "data.valid_fraction=0.0",
            f"sparse.variant={variant}",
            f"sparse.backend={backend}",
        ],
    )


def _pct(pred: float, meas: float) -> float:
    return pred / meas - 1.0


def train_step_rows(paths: list[str]) -> list[dict]:
    """Predicted vs measured rows for every row of the train-step bench files."""
    from megatron_longgen.launch.gpus import GIB, get_gpu
    from megatron_longgen.launch.layout import Layout
    from megatron_longgen.launch.memory import estimate_memory
    from megatron_longgen.launch.timing import estimate_step_time

    gpu = get_gpu("h200")
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for r in data.get("rows", []):
            if "pattern" not in r or "seq_length" not in r:
                continue
            recompute = r.get("recompute") or data.get("recompute", "full")
            backend = r.get("sparse_backend") or "auto"
            cfg = bench_model_config(
                pattern=r["pattern"],
                seq_length=r["seq_length"],
                recompute=recompute,
                variant=r.get("sparse_variant") or "sink_window",
                backend=backend,
            )
            layout = Layout(tp=1, pp=1, cp=1, dp=1, recompute=recompute, sequence_parallel=False)
            mem = estimate_memory(cfg, layout).peak_bytes
            row = {
                "source": os.path.basename(path),
                "pattern": r["pattern"],
                "seq_length": r["seq_length"],
                "recompute": recompute,
                "sparse_backend": r.get("sparse_backend"),
                "predicted_mem_gib": mem / GIB,
                # The verdict the launch validator gives: the plan must leave its headroom free (non-PyTorch
                # memory measured at 12-13.5 GiB on the H200 beside ~6 GiB of allocator slack).
                "predicted_fits": mem <= (1 - LaunchPolicy().memory_headroom) * gpu.usable_bytes,
            }
            if "error" in r:
                row.update(
                    measured="OOM" if "out of memory" in r["error"] else r["error"][:80],
                    ok=not row["predicted_fits"] if "out of memory" in r["error"] else None,
                )
                out.append(row)
                continue
            step = estimate_step_time(cfg, layout, gpu).total
            row.update(
                measured_mem_gib=r["peak_mem_gib"],
                mem_error=_pct(mem / GIB, r["peak_mem_gib"]),
                predicted_step_s=step,
                measured_step_s=r["step_time_s"],
                time_error=_pct(step, r["step_time_s"]),
            )
            row["ok"] = abs(row["mem_error"]) <= MEMORY_TOLERANCE and abs(row["time_error"]) <= TIME_TOLERANCE
            out.append(row)
    return out


def context_parallel_rows(path: str) -> list[dict]:
    """CP=2 predicted from the measured CP=1 time (the CP model), and CP=1 predicted from the GPU table."""
    from megatron_longgen.launch.gpus import get_gpu
    from megatron_longgen.launch.timing import cp_attention_seconds

    gpu = get_gpu("h200")
    data = json.loads(Path(path).read_text())
    shape = data["shape"]
    seq, heads, kv_heads, head_dim = shape["seq_len"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    cp = data.get("gpus", 2)
    tokens = seq // cp
    out = []

    def add(
        kind: str,
        name: str,
        kernel: str,
        timing: dict,
        rates: tuple[float, float] | None,
        pairs: int,
        halo_tokens: float,
    ) -> None:
        measured_cp1, measured_cp2 = timing["cp1_ms"] / 1e3, timing["cp2_ms"] / 1e3
        # Forward / backward shares of the measured time from the kernel's rates (equal rates when unknown).
        rf, rb = rates or (1.0, 1.0)
        fwd_share = (1 / rf) / (1 / rf + 2.5 / rb)
        predicted = cp_attention_seconds(
            attn_fwd_s=measured_cp1 * fwd_share / cp,
            attn_bwd_s=measured_cp1 * (1 - fwd_share) / cp,
            kind=kind,
            cp=cp,
            kv_token_elems=2 * kv_heads * head_dim,
            act_bytes=2,
            local_tokens=tokens,
            halo_tokens=halo_tokens,
            bandwidth_gbps=gpu.nvlink_gbps,
            latency_s=gpu.intra_latency_s,
        )
        row = {
            "source": os.path.basename(path),
            "layer": name,
            "kernel": kernel,
            "seq_length": seq,
            "measured_cp1_s": measured_cp1,
            "measured_cp2_s": measured_cp2,
            "predicted_cp2_s": predicted,
            "time_error": _pct(predicted, measured_cp2),
        }
        if rates is not None and kernel != "flex":  # the table's flex rates come from these CP=1 rows
            flops = 4 * pairs * heads * head_dim
            table_cp1 = flops / (rates[0] * 1e12) + 2.5 * flops / (rates[1] * 1e12)
            row.update(predicted_cp1_s=table_cp1, rate_error=_pct(table_cp1, measured_cp1))
        row["ok"] = (
            abs(row["time_error"]) <= TIME_TOLERANCE and abs(row.get("rate_error", 0.0)) <= TIME_TOLERANCE
        )
        out.append(row)

    full_pairs = seq * (seq + 1) // 2
    for kernel, timing in data.get("full", {}).get("timings", {}).items():
        rates = gpu.dense_attn_tflops if kernel == "cudnn" else None
        add("F", "full", kernel, timing, rates, full_pairs, 0.0)
    for variant, info in data.get("sparse", {}).items():
        per_block = 2 * kv_heads * head_dim * 2  # K and V bytes per token
        halo = max(info.get("bytes_received_fwd_per_rank", [0])) / per_block
        pairs = _sparse_pairs(variant, seq)
        for kernel, timing in info.get("timings", {}).items():
            key = f"{variant}/{kernel}"
            rates = gpu.sparse_attn_tflops.get(key)
            add("S", variant, kernel, timing, rates, pairs, halo)
    return out


def _sparse_pairs(variant: str, seq: int) -> int:
    from megatron_longgen.attention.masks import attended_pairs, pattern_from_config
    from megatron_longgen.config import SparseAttentionConfig

    return attended_pairs(pattern_from_config(SparseAttentionConfig(variant=variant)), seq)


def validate_against_measurements(results_dir: str | os.PathLike) -> dict:
    """All validation rows from the JSON files found in `results_dir` (module docstring)."""
    root = Path(results_dir)
    steps = sorted(glob.glob(str(root / "train_step_*h200*.json")))
    cp = root / "context_parallel_h200.json"
    rates = {}
    for path in steps:
        data = json.loads(Path(path).read_text())
        if "rates" in data:
            rates[os.path.basename(path)] = data["rates"]
    return {
        "tolerances": {"memory": MEMORY_TOLERANCE, "step_time": TIME_TOLERANCE},
        "measured_rates": rates,
        "gpu": "h200",
        "sources": [os.path.basename(p) for p in steps] + ([cp.name] if cp.is_file() else []),
        "train_step": train_step_rows(steps),
        "context_parallel": context_parallel_rows(str(cp)) if cp.is_file() else [],
    }


def _fmt_err(value: float | None) -> str:
    return "" if value is None else f"{value:+.1%}"


def format_markdown(result: dict) -> str:
    """The committed table (`benchmarks/results/planner_validation_h200.md`)."""
    from megatron_longgen.launch.gpus import GPUS

    g = GPUS["h200"]
    steps, cps = result["train_step"], result["context_parallel"]
    measured = [r for r in steps if "mem_error" in r]
    ok_steps = sum(bool(r["ok"]) for r in steps if r["ok"] is not None)
    lines = [
        "# Planner validation on the H200",
        "",
        "Generated by `python tools/plan_parallelism.py --validate` from "
        + ", ".join(f"`{s}`" for s in result["sources"])
        + ".",
        (
            f"Targets: peak memory within {MEMORY_TOLERANCE:.0%}, step time within {TIME_TOLERANCE:.0%}; an "
            "out-of-memory run must be predicted not to fit. The planner's rates come from kernel benchmarks "
            f"(`megatron_longgen/launch/gpus.py`: GEMM {g.matmul_tflops:.0f} TFLOP/s, HBM {g.hbm_gbps:.0f} GB/s, "
            f"dense attention {g.dense_attn_tflops[0]:.0f}/{g.dense_attn_tflops[1]:.0f} TFLOP/s fwd/bwd), "
            "not from these end-to-end runs."
        ),
        "",
    ]
    for source, r in result.get("measured_rates", {}).items():
        lines.append(
            f"Rates measured in `{source}`: bf16 GEMM {r['gemm_tflops_harmonic_mean']:.0f} TFLOP/s (harmonic "
            f"mean over the layer's projection shapes; table {g.matmul_tflops:.0f}), device copy "
            f"{r['copy_gbps']:.0f} GB/s (table: {g.hbm_gbps:.0f} GB/s for element-wise kernels)."
        )
        lines.append("")
    lines += [
        "## Training step (7B-shaped, few layers, one GPU)",
        "",
        (
            "| source | pattern | seq | recompute | backend | mem pred GiB | mem meas GiB | mem err | step pred s "
            "| step meas s | time err | ok |"
        ),
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in steps:
        if "mem_error" in r:
            lines.append(
                f"| {r['source']} | {r['pattern']} | {r['seq_length']} | {r['recompute']} | {r['sparse_backend'] or '-'} "
                f"| {r['predicted_mem_gib']:.1f} | {r['measured_mem_gib']:.1f} | {_fmt_err(r['mem_error'])} "
                f"| {r['predicted_step_s']:.3f} | {r['measured_step_s']:.3f} | {_fmt_err(r['time_error'])} "
                f"| {'yes' if r['ok'] else 'NO'} |"
            )
        else:
            verdict = {True: "yes", False: "NO", None: "-"}[r["ok"]]
            lines.append(
                f"| {r['source']} | {r['pattern']} | {r['seq_length']} | {r['recompute']} | {r['sparse_backend'] or '-'} "
                f"| {r['predicted_mem_gib']:.1f} ({'fits' if r['predicted_fits'] else 'does not fit'}) "
                f"| {r['measured']} | | | | | {verdict} |"
            )
    if measured:
        worst_m = max(abs(r["mem_error"]) for r in measured)
        worst_t = max(abs(r["time_error"]) for r in measured)
        lines += [
            "",
            (
                f"{ok_steps} of {sum(r['ok'] is not None for r in steps)} rows within target; worst memory "
                f"error {worst_m:.1%}, worst step-time error {worst_t:.1%}."
            ),
        ]
    if cps:
        lines += [
            "",
            "## Context parallelism (one attention layer, 128K, fwd+bwd; CP=2 on two H200s)",
            "",
            (
                "`cp2 pred` = the CP model applied to the measured CP=1 time (even split, ring hops overlapped with "
                "the step kernels, sparse halo exchanged before the kernel); `cp1 pred` = the GPU table's rate "
                "for that kernel, where the table has it from another benchmark (its Flex rates are these CP=1 "
                "rows, so they are not compared here)."
            ),
            "",
            "| layer | kernel | cp1 meas ms | cp1 pred ms | rate err | cp2 meas ms | cp2 pred ms | CP err | ok |",
            "|---|---|---:|---:|---:|---:|---:|---:|:-:|",
        ]
        for r in cps:
            cp1_pred = f"{r['predicted_cp1_s'] * 1e3:.1f}" if "predicted_cp1_s" in r else "-"
            lines.append(
                f"| {r['layer']} | {r['kernel']} | {r['measured_cp1_s'] * 1e3:.1f} | {cp1_pred} "
                f"| {_fmt_err(r.get('rate_error'))} | {r['measured_cp2_s'] * 1e3:.1f} | {r['predicted_cp2_s'] * 1e3:.1f} "
                f"| {_fmt_err(r['time_error'])} | {'yes' if r['ok'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
