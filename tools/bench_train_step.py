"""Time real training steps of a LongGen recipe and its full-attention baseline in one process.

    python tools/bench_train_step.py --pattern SSFFSS --seq-lengths 32768 65536 --steps 3 --warmup 2
    # the planner's validation set (~5 minutes on one H200):
    python tools/bench_train_step.py --pattern SSFFSS --seq-lengths 32768 65536 131072 \\
        --recompute none selective full --steps 2 --warmup 1 --out benchmarks/results/train_step_recompute_h200.json

For each sequence length and recompute mode, builds the `llama2_7b_128k` model shape with the given layer
pattern (few layers, one GPU: TP=PP=CP=1; `launch/validation.py:bench_model_config`), and the same run with
every layer full (the `_full` baseline), then runs `Trainer.train_step` (forward, backward, distributed
optimizer step; bf16 with fp32 main params) and reports median step time, tokens/s, executed and
dense-equivalent TFLOP/s, MFU and peak memory, plus the LongGen/full step-time ratio. A run that runs out
of memory is a data point: its row records the error and the memory allocated when it failed. Before the
runs it measures the rates the planner's GPU table assumes (`rates`: bf16 GEMM TFLOP/s on the model's
projection shapes, streaming copy bandwidth). Runs that would start after `--time-budget-s` are recorded
as not run. Writes the JSON after every row (default `benchmarks/results/train_step_<device>.json`) and
prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def bench_config(*, pattern: str, seq_length: int, recompute: str, variant: str, backend: str):
    from megatron_longgen.launch.validation import bench_model_config

    return bench_model_config(
        pattern=pattern, seq_length=seq_length, recompute=recompute, variant=variant, backend=backend
    )


def _sparse_backend_in_use(trainer) -> str | None:
    from megatron_longgen.attention.core_attention import LongGenCoreAttention

    for module in trainer.model[0].modules():
        if isinstance(module, LongGenCoreAttention) and module.kind == "sparse":
            return module.resolved.name
    return None


def measure_rates(*, hidden: int, ffn: int, tokens: int = 32768) -> dict:
    """bf16 GEMM TFLOP/s on the layer's projection shapes (forward, data and weight gradients) and the
    bandwidth of a large device-to-device copy: the rates `launch/gpus.py` assumes."""
    import torch

    def timed(fn, a, b, repeats: int = 5) -> float:
        fn(a, b)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn(a, b)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    dev, dt = "cuda", torch.bfloat16
    gemms = {}
    for name, k, n in (("qkv", hidden, 3 * hidden), ("fc1", hidden, 2 * ffn), ("fc2", ffn, hidden)):
        x = torch.randn(tokens, k, device=dev, dtype=dt)
        w = torch.randn(k, n, device=dev, dtype=dt)
        g = torch.randn(tokens, n, device=dev, dtype=dt)
        flops = 2 * tokens * k * n
        gemms[f"{name}_fwd"] = flops / timed(torch.matmul, x, w) / 1e12
        gemms[f"{name}_dgrad"] = flops / timed(torch.matmul, g, w.t()) / 1e12
        gemms[f"{name}_wgrad"] = flops / timed(torch.matmul, x.t(), g) / 1e12
    src = torch.empty(2**31, dtype=torch.uint8, device=dev)
    copy_s = timed(torch.Tensor.copy_, torch.empty_like(src), src)
    del x, w, g, src
    torch.cuda.empty_cache()
    flops_weighted = statistics.harmonic_mean(gemms.values())
    return {
        "gemm_tflops": gemms,
        "gemm_tflops_harmonic_mean": flops_weighted,
        "copy_gbps": 2 * 2**31 / copy_s / 1e9,
        "tokens": tokens,
    }


def run_one(cfg, *, warmup: int, steps: int) -> dict:
    """Build a Trainer for `cfg`, run `warmup` untimed and `steps` timed optimizer steps."""
    import torch

    from megatron_longgen.training.flops import throughput_metrics, training_flops_per_step
    from megatron_longgen.training.trainer import Trainer

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=warmup + steps))
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir=run_dir, quiet=True)
        try:
            times, losses = [], []
            for step in range(warmup + steps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                metrics = trainer.train_step(step)
                torch.cuda.synchronize()
                if step >= warmup:
                    times.append(time.perf_counter() - start)
                losses.append(metrics["loss"])
            backend = _sparse_backend_in_use(trainer)
            peak = trainer._peak_tflops()
        finally:
            del trainer
    step_time = statistics.median(times)
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    return {
        "pattern": cfg.model.layer_pattern,
        "seq_length": cfg.train.seq_length,
        "sparse_variant": cfg.sparse.variant if "S" in cfg.model.layer_pattern else None,
        "sparse_backend": backend,
        "recompute": cfg.train.recompute,
        "step_time_s": step_time,
        "step_times_s": times,
        "tokens_per_s": tokens / step_time,
        "tokens_per_s_per_gpu": tokens / step_time,
        "train_flops_per_step_executed": training_flops_per_step(cfg),
        "train_flops_per_step_dense_equiv": training_flops_per_step(cfg, dense_equivalent=True),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "losses": losses,
        **throughput_metrics(cfg=cfg, step_time_s=step_time, num_gpus=1, peak_tflops=peak),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="SSFFSS", help="LongGen layer pattern (the baseline is all F)")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--recompute",
        choices=("none", "selective", "full"),
        nargs="+",
        default=["full"],
        help="one or several activation recompute modes",
    )
    parser.add_argument("--sparse-variant", default="sink_window")
    parser.add_argument("--backend", default="auto", help="sparse kernel backend")
    parser.add_argument("--no-rates", action="store_true", help="skip the GEMM / copy rate measurements")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=330.0,
        help="start no new run after this many seconds (default 330)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/train_step_<device>.json)"
    )
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_train_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    from megatron_longgen.utils.distributed import destroy

    began = time.perf_counter()
    device = torch.cuda.get_device_name()
    full = "F" * len(args.pattern)
    rows: list[dict] = []
    slug = device.split()[-1].lower() if device else "gpu"
    out = Path(args.out or f"benchmarks/results/train_step_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "device": device,
        "total_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": "llama2_7b_128k shape (hidden 4096, 32 heads, ffn 11008, vocab 32000), few layers, "
        "TP=PP=CP=1, micro/global batch 1, bf16 + fp32 main params, distributed optimizer",
        "pattern": args.pattern,
        "recompute": args.recompute[0] if len(args.recompute) == 1 else args.recompute,
        "steps": args.steps,
        "warmup": args.warmup,
    }

    def write() -> (
        None
    ):  # after every row (to a temporary name, then renamed), so a cut run keeps its numbers
        payload = dict(header, date_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), rows=rows)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(out)

    try:
        if not args.no_rates:
            base = bench_config(
                pattern=args.pattern,
                seq_length=args.seq_lengths[0],
                recompute="full",
                variant=args.sparse_variant,
                backend=args.backend,
            )
            header["rates"] = measure_rates(hidden=base.model.hidden_size, ffn=base.model.ffn_hidden_size)
            print(json.dumps({"rates": header["rates"]}), flush=True)
            write()
        for seq in args.seq_lengths:
            for mode in args.recompute:
                pair = {}
                for pattern in (args.pattern, full):
                    if time.perf_counter() - began > args.time_budget_s:
                        row = {
                            "pattern": pattern,
                            "seq_length": seq,
                            "recompute": mode,
                            "error": f"not run: time budget of {args.time_budget_s:g} s spent",
                        }
                    else:
                        cfg = bench_config(
                            pattern=pattern,
                            seq_length=seq,
                            recompute=mode,
                            variant=args.sparse_variant,
                            backend=args.backend,
                        )
                        error = None
                        try:
                            row = run_one(cfg, warmup=args.warmup, steps=args.steps)
                        except torch.OutOfMemoryError as exc:
                            error = f"out of memory: {exc}"[:300]
                        if error is not None:  # outside the handler: the traceback no longer pins tensors
                            row = {
                                "pattern": pattern,
                                "seq_length": seq,
                                "recompute": mode,
                                "error": error,
                                "sparse_variant": cfg.sparse.variant if "S" in pattern else None,
                                "peak_mem_gib_at_oom": torch.cuda.max_memory_allocated() / 2**30,
                            }
                        gc.collect()
                        torch.cuda.empty_cache()
                    pair[pattern] = row
                    rows.append(row)
                    print(
                        json.dumps({k: v for k, v in row.items() if k not in ("losses", "step_times_s")}),
                        flush=True,
                    )
                    write()
                if "step_time_s" in pair[args.pattern] and "step_time_s" in pair[full]:
                    pair[args.pattern]["step_time_ratio_vs_full"] = (
                        pair[args.pattern]["step_time_s"] / pair[full]["step_time_s"]
                    )
                    write()
    finally:
        destroy()

    print(f"\n{device}, 7B-shaped {len(args.pattern)}-layer model, bf16, one GPU")
    if "rates" in header:
        r = header["rates"]
        print(
            f"GEMM {r['gemm_tflops_harmonic_mean']:.0f} TFLOP/s (harmonic mean of "
            f"{len(r['gemm_tflops'])} shapes), copy {r['copy_gbps']:.0f} GB/s"
        )
    print(
        f"{'pattern':<10}{'seq':>8}{'recompute':>10}{'step s':>9}{'tok/s':>10}{'TF/s exec':>11}"
        f"{'TF/s dense':>11}{'MFU':>7}{'mem GiB':>9}{'ratio':>7}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['pattern']:<10}{r['seq_length']:>8}{r['recompute']:>10}  {r['error'][:60]}")
            continue
        ratio = r.get("step_time_ratio_vs_full")
        print(
            f"{r['pattern']:<10}{r['seq_length']:>8}{r['recompute']:>10}{r['step_time_s']:>9.3f}"
            f"{r['tokens_per_s']:>10.0f}{r['tflops_per_gpu']:>11.1f}{r['tflops_per_gpu_dense_equiv']:>11.1f}"
            f"{r.get('mfu', float('nan')):>7.3f}{r['peak_mem_gib']:>9.1f}{(f'{ratio:.3f}' if ratio else ''):>7}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
