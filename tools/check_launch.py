"""Validate a launch before it queues for hours: sizes, inputs, files, and the memory / step-time plan.

    python tools/check_launch.py --recipe llama2_70b_128k --nodes 8 --gpus-per-node 8 --gpu h100-80gb \\
        --data-blend "/data/long_docs" --tokenizer /ckpt/llama2_70b_hf --init-checkpoint /ckpt/llama2_70b_mcore
    DRY_RUN=1 sbatch slurm/llama2_70b_128k.sh          # the Slurm scripts call this with $EXTRA_ARGS and stop

Takes every `longgen-train` flag (the same parser: `--max-steps`, `--override`, `--attention`, `--data-blend`,
...; `--run-dir` optional), so the command checks exactly what `EXTRA_ARGS` will train, plus `--nodes`,
`--gpus-per-node`, `--gpu` (GPU model for the memory / step-time plan; default $LONGGEN_GPU or h100-80gb;
`none` skips the plan), `--signal-lead-s`, `--fs-write-gbps`, `--max-data-epochs`, `--no-check-files`.
The production inputs also come from LONGGEN_DATA_BLEND / LONGGEN_TOKENIZER / LONGGEN_INIT_CHECKPOINT.

Runs in one CPU process without torch.distributed (`megatron_longgen.launch.validate_launch`). Prints the
launch (layout, batch, pipeline stages, FLOPs, data epochs, memory and time plan), the warnings and
"launch OK"; exits 2 with one line per problem (`check_launch: error: ...`) when the launch cannot run.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from megatron_longgen.launch.gpus import GPUS
    from megatron_longgen.train import build_parser as train_parser

    parser = train_parser(run_dir_required=False)
    parser.prog = "check_launch"
    parser.description = "Validate a longgen-train launch (all longgen-train flags are accepted)."
    group = parser.add_argument_group("allocation and plan")
    group.add_argument("--nodes", type=int, default=1)
    group.add_argument("--gpus-per-node", type=int, default=8)
    group.add_argument(
        "--gpu",
        default=os.environ.get("LONGGEN_GPU", "h100-80gb"),
        help=f"GPU model for the memory / step-time plan: {sorted(GPUS)} or none",
    )
    group.add_argument(
        "--signal-lead-s",
        type=float,
        default=None,
        help="seconds between Slurm's USR1 and the time limit (default $LONGGEN_SIGNAL_LEAD_S or 180)",
    )
    group.add_argument(
        "--fs-write-gbps",
        type=float,
        default=10.0,
        help="aggregate file-system write bandwidth for checkpoints, GB/s (default 10)",
    )
    group.add_argument(
        "--max-data-epochs",
        type=float,
        default=4.0,
        help="refuse a data blend the run would repeat more often than this (default 4)",
    )
    group.add_argument(
        "--memory-check",
        choices=("error", "warn", "off"),
        default="error",
        help="what a predicted out-of-memory does (default error)",
    )
    group.add_argument(
        "--no-check-files",
        action="store_true",
        help="do not read the tokenizer, the data blend or the initial checkpoint",
    )
    return parser


def check(args: argparse.Namespace):
    """The `LaunchReport` for parsed arguments; raises ValueError (LaunchError) with every problem."""
    from megatron_longgen.launch.gpus import get_gpu
    from megatron_longgen.launch.validate import LaunchPolicy, validate_launch
    from megatron_longgen.train import config_from_args

    if args.signal_lead_s is None:
        text = os.environ.get("LONGGEN_SIGNAL_LEAD_S", "180")
        try:
            args.signal_lead_s = float(text)
        except ValueError:
            raise ValueError(f"LONGGEN_SIGNAL_LEAD_S must be a number of seconds, got {text!r}") from None
    bad = [
        f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
        for name in ("nodes", "gpus_per_node")
        if getattr(args, name) < 1
    ]
    bad += [
        f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
        for name in ("signal_lead_s", "fs_write_gbps", "max_data_epochs")
        if not getattr(args, name) > 0
    ]
    if bad:
        raise ValueError("\n".join(bad))
    gpu = None if args.gpu.lower() == "none" else get_gpu(args.gpu)
    cfg = config_from_args(args)
    policy = LaunchPolicy(
        max_data_epochs=args.max_data_epochs,
        signal_lead_s=args.signal_lead_s,
        fs_write_gbps=args.fs_write_gbps,
        memory_check=args.memory_check,
    )
    return validate_launch(
        cfg,
        world_size=args.nodes * args.gpus_per_node,
        gpu=gpu,
        gpus_per_node=args.gpus_per_node,
        check_files=not args.no_check_files,
        policy=policy,
    )


def main(argv: list[str] | None = None) -> int:
    from megatron_longgen.launch.validate import LaunchError

    args = build_parser().parse_args(argv)
    try:
        report = check(args)
    except LaunchError as exc:
        if exc.report is not None:
            print(exc.report.format())
        for problem in exc.problems:
            print(f"check_launch: error: {problem}", file=sys.stderr)
        return 2
    except ValueError as exc:
        for problem in str(exc).splitlines():
            print(f"check_launch: error: {problem}", file=sys.stderr)
        return 2
    print(report.format())
    print("launch OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
