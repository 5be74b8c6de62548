"""Which parallel layout fits, and how fast it goes: every TP x PP x CP x DP x recompute x micro-batch
candidate of a recipe on N GPUs, with per-GPU memory and step time, ranked.

    python tools/plan_parallelism.py --recipe llama2_70b_128k --gpus 64 --gpu h100-80gb
    python tools/plan_parallelism.py --recipe llama2_7b_128k --gpus 64 --gpu h200 --top 5
    python tools/plan_parallelism.py --validate          # planner vs the H200 measurements -> table
    python tools/plan_parallelism.py --recipe llama2_70b_128k --gpus 256 --top 5 $EXTRA_ARGS   # in a job log

Takes every `longgen-train` flag (`--attention full` plans the baseline, `--override parallel.*` /
`train.*` change the config; data and checkpoint flags are accepted and ignored).

Prints the ranked table (memory of the busiest GPU and its share of the usable memory, step time,
tokens/s/GPU, MFU executed and dense-equivalent, pipeline bubble and communication shares), the recommended
layout with its memory and time breakdown, the recipe's own layout, and LongGen against its full-attention
baseline. The recommendation: among the layouts that leave `--headroom` (10%) of the usable memory free
(the memory model is measured on one GPU, not yet under TP/CP/PP on many), those within `--tie` (5%) of
the fastest count as equally fast (the step-time model is within ~15% on the H200), and the one with the
fewest of PP and CP wins. The models are described in
`megatron_longgen/launch/memory.py` and `timing.py`; GPU figures and their sources in `launch/gpus.py`.
Exits 2 with a one-line error for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plan_parallelism --validate", add_help=False)
    p.add_argument(
        "--validate",
        action="store_true",
        help="compare the planner with benchmarks/results/*h200*.json and write the validation table",
    )
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    return p


def build_parser() -> argparse.ArgumentParser:
    """Every `longgen-train` flag (so a job's $EXTRA_ARGS plan what it will train) plus the planner's own."""
    from megatron_longgen.launch.gpus import GPUS
    from megatron_longgen.train import build_parser as train_parser

    p = train_parser(run_dir_required=False)
    p.prog = "plan_parallelism"
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("planner")
    g.add_argument("--gpus", type=int, required=True, help="total GPUs (nodes x GPUs per node)")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    g.add_argument("--top", type=int, default=15, help="rows of the table")
    g.add_argument(
        "--headroom",
        type=float,
        default=0.10,
        help="share of the usable memory a recommended layout leaves free (default 0.10)",
    )
    g.add_argument(
        "--tie",
        type=float,
        default=0.05,
        help="layouts within this share of the fastest count as equally fast (default 0.05)",
    )
    g.add_argument(
        "--fs-write-gbps",
        type=float,
        default=10.0,
        help="aggregate file-system write bandwidth for checkpoints, GB/s (default 10)",
    )
    g.add_argument(
        "--signal-lead-s",
        type=float,
        default=180.0,
        help="Slurm signal lead time before the time limit, s (default 180)",
    )
    g.add_argument("--json", metavar="PATH", help="also write every candidate's figures as JSON")
    g.add_argument("--validate", action="store_true", help="see --validate above: no recipe needed")
    return p


def _row_dict(row) -> dict:
    import dataclasses

    s = row.step
    return {
        "layout": dataclasses.asdict(row.layout),
        "peak_mem_gib": row.peak_bytes / 2**30,
        "usable_gib": row.usable_bytes / 2**30,
        "fits": row.fits,
        "busiest_stage": row.memory.peak.stage,
        "step_time_s": s.total,
        "components_s": {k: v for k, v in dataclasses.asdict(s).items() if isinstance(v, float)},
        "tokens_per_s_per_gpu": row.tokens_per_s_per_gpu,
        "mfu": row.mfu,
        "mfu_dense_equiv": row.mfu_dense_equiv,
        "checkpoint_save_s": row.checkpoint_save_s,
    }


def run_validate(args) -> int:
    from megatron_longgen.launch.validation import (
        format_markdown,
        validate_against_measurements,
        write_atomic,
    )

    result = validate_against_measurements(args.results_dir)
    if not result["sources"]:
        print(f"plan_parallelism: error: no *h200*.json results in {args.results_dir}", file=sys.stderr)
        return 2
    markdown = format_markdown(result)
    out = Path(args.results_dir)
    write_atomic(out / "planner_validation_h200.md", markdown)
    write_atomic(out / "planner_validation_h200.json", json.dumps(result, indent=2) + "\n")
    print(markdown)
    print(f"wrote {out / 'planner_validation_h200.md'} and .json")
    return 0


def run_plan(args) -> int:
    from megatron_longgen.launch.gpus import GIB, get_gpu
    from megatron_longgen.launch.layout import layout_from_config
    from megatron_longgen.launch.plan import (
        HEADER,
        describe_row,
        evaluate_layout,
        format_row,
        plan,
        recommend,
    )
    from megatron_longgen.recipes import with_full_attention
    from megatron_longgen.train import config_from_args

    cfg = config_from_args(args)  # --attention full plans the baseline; --override parallel.* etc. apply
    gpu = get_gpu(args.gpu)
    common = {"gpus_per_node": args.gpus_per_node, "fs_write_gbps": args.fs_write_gbps}
    rows = plan(cfg, world_size=args.gpus, gpu=gpu, headroom=args.headroom, **common)
    if not rows:
        print(
            f"plan_parallelism: error: no layout of {cfg.name} divides {args.gpus} GPUs with global batch "
            f"{cfg.train.global_batch_size}",
            file=sys.stderr,
        )
        return 2
    comfortable = [r for r in rows if r.fits_within(args.headroom)]
    nodes = args.gpus / args.gpus_per_node
    print(
        f"{cfg.name} ({cfg.model.num_layers} layers, seq {cfg.train.seq_length}, global batch "
        f"{cfg.train.global_batch_size}) on {args.gpus} x {gpu.description} ({nodes:g} nodes of "
        f"{args.gpus_per_node})"
    )
    print(
        f"usable memory {gpu.usable_bytes / GIB:.1f} GiB per GPU; {len(rows)} layouts, {sum(r.fits for r in rows)} "
        f"fit, {len(comfortable)} with {args.headroom:.0%} headroom; rates "
        f"{'measured on this GPU' if gpu.measured else 'derived from the H200 measurements'} (launch/gpus.py)"
    )
    print(HEADER)
    for i, row in enumerate(rows[: args.top]):
        print(format_row(i + 1, row))
    if not comfortable:
        print("no layout fits: more GPUs, a shorter sequence or a smaller global batch are needed")
        return 0
    best = recommend(rows, headroom=args.headroom, tie=args.tie)
    print(
        f"\nrecommended (fits with {args.headroom:.0%} headroom; of the layouts within {args.tie:.0%} of the fastest, "
        f"the one with the fewest of PP and CP):"
    )
    print("\n".join(describe_row(best)))
    try:
        own = layout_from_config(cfg, world_size=args.gpus)
        own_row = evaluate_layout(cfg, own, gpu, **common)
        rank = next((i + 1 for i, r in enumerate(rows) if r.layout == own), None)
        print(
            f"\nrecipe's layout ({own.short()}, recompute {own.recompute}): rank {rank}, "
            f"{own_row.tokens_per_s_per_gpu:.0f} tokens/s/GPU, {own_row.peak_bytes / GIB:.1f} GiB "
            f"({'fits' if own_row.fits else 'does NOT fit'})"
        )
    except ValueError as exc:
        print(f"\nrecipe's layout does not run on {args.gpus} GPUs: {exc}")
    if not cfg.is_full_attention:
        full = with_full_attention(cfg)
        full_row = evaluate_layout(full, best.layout, gpu, **common)
        full_best = (
            recommend(
                plan(full, world_size=args.gpus, gpu=gpu, headroom=args.headroom, **common),
                headroom=args.headroom,
                tie=args.tie,
            )
            or full_row
        )
        print(
            f"\nLongGen vs full attention on {args.gpus} x {gpu.name}, layout {best.layout.short()} "
            f"recompute {best.layout.recompute}:"
        )
        print(
            f"  LongGen  {cfg.name:<24} {best.tokens_per_s_per_gpu:>7.0f} tokens/s/GPU  MFU {best.mfu:.3f} "
            f"(dense-equivalent {best.mfu_dense_equiv:.3f})  step {best.step.total:.1f} s"
        )
        print(
            f"  full     {full.name:<24} {full_row.tokens_per_s_per_gpu:>7.0f} tokens/s/GPU  MFU "
            f"{full_row.mfu:.3f}  step {full_row.step.total:.1f} s  "
            f"({'fits' if full_row.fits else 'does NOT fit'})"
        )
        print(
            f"  speedup {best.tokens_per_s_per_gpu / full_row.tokens_per_s_per_gpu:.2f}x; full attention's own "
            f"recommendation: "
            f"{full_best.layout.short()} recompute {full_best.layout.recompute}, "
            f"{full_best.tokens_per_s_per_gpu:.0f} tokens/s/GPU, MFU {full_best.mfu:.3f}"
        )
    needed = best.step.total + best.checkpoint_save_s
    if needed > args.signal_lead_s:
        print(
            f"\nwarning: finishing a step (~{best.step.total:.0f} s) and saving a checkpoint "
            f"(~{best.checkpoint_save_s:.0f} s at {args.fs_write_gbps:g} GB/s) takes ~{needed:.0f} s, more than the "
            f"signal lead time of {args.signal_lead_s:g} s"
        )
    if args.json:
        from megatron_longgen.launch.validation import write_atomic

        write_atomic(
            args.json,
            json.dumps(
                {
                    "recipe": cfg.name,
                    "gpus": args.gpus,
                    "gpu": gpu.name,
                    "rows": [_row_dict(r) for r in rows],
                },
                indent=2,
            )
            + "\n",
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--validate" in argv:
        return run_validate(build_validate_parser().parse_known_args(argv)[0])
    args = build_parser().parse_args(argv)
    problem = None
    if min(args.gpus, args.gpus_per_node, args.top) < 1:
        problem = (
            f"--gpus, --gpus-per-node and --top must be >= 1, got {args.gpus}, {args.gpus_per_node} "
            f"and {args.top}"
        )
    elif not (0.0 <= args.headroom < 1.0 and 0.0 <= args.tie < 1.0):
        problem = f"--headroom and --tie must be in [0, 1), got {args.headroom} and {args.tie}"
    elif args.fs_write_gbps <= 0 or args.signal_lead_s <= 0:
        problem = f"--fs-write-gbps and --signal-lead-s must be > 0, got {args.fs_write_gbps} and {args.signal_lead_s}"
    if problem:
        print(f"plan_parallelism: error: {problem}", file=sys.stderr)
        return 2
    try:
        return run_plan(args)
    except ValueError as exc:
        print(f"plan_parallelism: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
