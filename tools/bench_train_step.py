"""Time real training steps of a LongGen recipe and its full-attention baseline in one process.

    python tools/bench_train_step.py --pattern SSFFSS --seq-lengths 32768 65536 --steps 3 --warmup 2

For each sequence length, builds the `llama2_7b_128k` model shape with the given layer pattern (few layers,
one GPU: TP=PP=CP=1), and the same run with every layer full (the `_full` baseline), then runs
`Trainer.train_step` (forward, backward, distributed optimizer step; bf16 with fp32 main params) and reports
median step time, tokens/s, executed and dense-equivalent TFLOP/s, MFU and peak memory, plus the
LongGen/full step-time ratio. Writes `benchmarks/results/train_step_<device>.json` and prints a table.
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
            "data.valid_fraction=0.0",
            f"sparse.variant={variant}",
            f"sparse.backend={backend}",
        ],
    )


def _sparse_backend_in_use(trainer) -> str | None:
    for module in trainer.model[0].modules():
        kernel = getattr(module, "_kernel", None)
        if kernel is not None:
            return getattr(kernel, "name", type(kernel).__name__)
    return None


def run_one(cfg, *, warmup: int, steps: int) -> dict:
    """Build a Trainer for `cfg`, run `warmup` untimed and `steps` timed optimizer steps."""
    import torch

    from megatron_longgen.training.flops import throughput_metrics, training_flops_per_step
    from megatron_longgen.training.trainer import Trainer

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=warmup + steps))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir=run_dir, quiet=True)
        torch.cuda.reset_peak_memory_stats()
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
        del trainer
    step_time = statistics.median(times)
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    row = {
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
        "losses": losses,
        **throughput_metrics(cfg=cfg, step_time_s=step_time, num_gpus=1, peak_tflops=peak),
    }
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="SSFFSS", help="LongGen layer pattern (the baseline is all F)")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="full")
    parser.add_argument("--sparse-variant", default="sink_window")
    parser.add_argument("--backend", default="auto", help="sparse kernel backend")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/train_step_<device>.json)"
    )
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_train_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    from megatron_longgen.utils.distributed import destroy

    device = torch.cuda.get_device_name()
    full = "F" * len(args.pattern)
    rows: list[dict] = []
    slug = device.split()[-1].lower() if device else "gpu"
    out = Path(args.out or f"benchmarks/results/train_step_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every row, so a run cut short still leaves its numbers
        out.write_text(
            json.dumps(
                {
                    "device": device,
                    "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "torch": torch.__version__,
                    "model": "llama2_7b_128k shape (hidden 4096, 32 heads, ffn 11008, vocab 32000), few layers, "
                    "TP=PP=CP=1, micro/global batch 1, bf16 + fp32 main params, distributed optimizer",
                    "pattern": args.pattern,
                    "recompute": args.recompute,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )

    try:
        for seq in args.seq_lengths:
            pair = {}
            for pattern in (args.pattern, full):
                cfg = bench_config(
                    pattern=pattern,
                    seq_length=seq,
                    recompute=args.recompute,
                    variant=args.sparse_variant,
                    backend=args.backend,
                )
                try:
                    row = run_one(cfg, warmup=args.warmup, steps=args.steps)
                except torch.OutOfMemoryError as exc:
                    row = {"pattern": pattern, "seq_length": seq, "error": f"out of memory: {exc}"[:300]}
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

    print(f"\n{device}, 7B-shaped {len(args.pattern)}-layer model, bf16, recompute={args.recompute}, one GPU")
    header = f"{'pattern':<10}{'seq':>8}{'step s':>9}{'tok/s':>10}{'TF/s exec':>11}{'TF/s dense':>11}{'MFU':>7}{'mem GiB':>9}{'ratio':>7}"
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['pattern']:<10}{r['seq_length']:>8}  {r['error'][:60]}")
            continue
        ratio = r.get("step_time_ratio_vs_full")
        print(
            f"{r['pattern']:<10}{r['seq_length']:>8}{r['step_time_s']:>9.3f}{r['tokens_per_s']:>10.0f}"
            f"{r['tflops_per_gpu']:>11.1f}{r['tflops_per_gpu_dense_equiv']:>11.1f}{r.get('mfu', float('nan')):>7.3f}"
            f"{r['peak_mem_gib']:>9.1f}{(f'{ratio:.3f}' if ratio else ''):>7}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
