"""`longgen-train` / `python -m megatron_longgen.train`: train a recipe.

    longgen-train --recipe debug_tiny --run-dir runs/tiny                      # CPU, ~1-2 minutes
    longgen-train --recipe debug_tiny --run-dir runs/tiny_bs --sparse-variant block_strided
    longgen-train --recipe debug_tiny --run-dir runs/tiny_full --attention full
    longgen-train --recipe debug_tiny --run-dir runs/tiny --max-steps 200 --save-interval 50 --resume
    torchrun --nproc-per-node 8 -m megatron_longgen.train --recipe llama2_7b_128k --run-dir runs/7b \
        --data-blend "data/long_docs" --tokenizer ckpt/llama2_7b_hf/tokenizer.model \
        --init-checkpoint ckpt/llama2_7b_mcore --save-interval 100 --resume

The production recipes (`llama2_*`) need `--data-blend`, `--tokenizer` and `--init-checkpoint`, or the
environment variables LONGGEN_DATA_BLEND, LONGGEN_TOKENIZER and LONGGEN_INIT_CHECKPOINT (which fill only
what a recipe leaves open; flags always win).

Writes RUN_DIR/config.json, RUN_DIR/metrics.jsonl (one JSON object per logged step) and
RUN_DIR/checkpoints/step_NNNNNNN/ (Megatron-Core distributed checkpoints of model and optimizer, RNG and
trainer state; the last `train.keep_last_checkpoints` kept; `checkpoints/latest` names the newest).

- A run dir that holds another run is refused unless `--resume` (continue it: exactly, the same losses as
  an uninterrupted run; the checkpoint must belong to the same model, pattern, tokenizer and data, and a
  changed schedule or parallel layout needs `--allow-change schedule|layout`) or `--overwrite` (the old
  contents move aside to RUN_DIR.old-<time>). A run that fails before its first step leaves no run dir.
- SIGTERM / SIGUSR1 / SIGINT save a checkpoint at the end of the current step and exit with status 0.
- Exit status: 0 finished or cleanly stopped by a signal; 2 a user error (one line on stderr naming the
  value and the fix; `--debug` or LONGGEN_DEBUG=1 adds the traceback); 1 a failure (e.g. a non-finite loss
  under `train.nan_policy=stop`, or a bug: traceback). One summary line per job, from the rank that owns
  the loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
import warnings

from megatron_longgen.config import SPARSE_VARIANTS, apply_overrides
from megatron_longgen.recipes import RECIPES, get_recipe, with_full_attention, with_sparse_variant
from megatron_longgen.utils.cli import add_debug_flag, add_override_argument

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser(*, run_dir_required: bool = True) -> argparse.ArgumentParser:
    """The `longgen-train` flags (`tools/check_launch.py` reuses them, with `--run-dir` optional)."""
    parser = argparse.ArgumentParser(prog="longgen-train", description="Train a LongGen recipe.")
    parser.add_argument(
        "--recipe", required=True, choices=sorted(RECIPES), help="named run (megatron_longgen/recipes.py)"
    )
    parser.add_argument(
        "--run-dir", required=run_dir_required, help="output folder (metrics, config, checkpoints)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument(
        "--save-interval",
        type=int,
        default=None,
        help="override train.save_interval (steps between checkpoints; 0: only on exit)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR/checkpoints/latest (a fresh start when there is none)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run dir that holds a run, moving its contents to RUN_DIR.old-<time>",
    )
    parser.add_argument(
        "--allow-change",
        nargs="*",
        default=[],
        choices=("schedule", "layout"),
        metavar="KIND",
        help="with --resume: accept a changed step budget / LR schedule ('schedule') or parallel "
        "layout ('layout')",
    )
    parser.add_argument(
        "--init-checkpoint",
        default=None,
        metavar="DIR",
        help="initial weights: a converted checkpoint folder (override train.init_checkpoint; "
        "env LONGGEN_INIT_CHECKPOINT)",
    )
    parser.add_argument(
        "--data-blend",
        default=None,
        metavar="'PREFIX ...'",
        help="Megatron indexed datasets to train on: 'PREFIX ...' or 'W PREFIX W PREFIX' "
        "(data.blend; env LONGGEN_DATA_BLEND)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="SentencePiece .model or HF tokenizer folder (data.tokenizer; env LONGGEN_TOKENIZER)",
    )
    parser.add_argument(
        "--sparse-variant", choices=SPARSE_VARIANTS, default=None, help="sparse pattern of S layers"
    )
    parser.add_argument(
        "--attention",
        choices=("hybrid", "full"),
        default="hybrid",
        help="'full' turns every layer into full attention (the baseline)",
    )
    parser.add_argument(
        "--wandb", action="store_true", help="also log to W&B (offline unless WANDB_MODE=online)"
    )
    add_override_argument(parser)
    parser.add_argument(
        "--quiet", action="store_true", help="no console lines (metrics.jsonl is still written)"
    )
    add_debug_flag(parser)
    return parser


def config_from_args(args: argparse.Namespace):
    from megatron_longgen.launch.inputs import resolve_inputs

    cfg = get_recipe(args.recipe)
    if args.sparse_variant:
        cfg = with_sparse_variant(cfg, args.sparse_variant)
    if args.attention == "full" and not cfg.is_full_attention:
        cfg = with_full_attention(cfg)
    overrides = list(args.override)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.save_interval is not None:
        overrides.append(f"train.save_interval={args.save_interval}")
    cfg = resolve_inputs(
        cfg, data_blend=args.data_blend, tokenizer=args.tokenizer, init_checkpoint=args.init_checkpoint
    )
    cfg = apply_overrides(cfg, overrides)
    if args.wandb:
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb=True))
    return cfg


def preflight(cfg, args: argparse.Namespace, *, quiet: bool = False) -> None:
    """Checks before any process group or model exists, each a ValueError naming the value and the fix: the
    run dir's ownership (`training/run_dir.py`), W&B credentials, and the launch validator
    (`launch/validate.py`: parallel sizes, data, tokenizer, initial checkpoint, and on a known GPU the memory
    plan). Rank 0 prints the validator's report."""
    from megatron_longgen.launch.validate import validate_launch_from_env
    from megatron_longgen.training import run_dir as rd

    state = rd.inspect(args.run_dir)
    rd.check_claim(state, resume=args.resume, overwrite=args.overwrite)
    if cfg.logging.wandb:
        mode = os.environ.get("WANDB_MODE", cfg.logging.wandb_mode)
        has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.isfile(os.path.expanduser("~/.netrc"))
        if mode == "online" and not has_key:
            raise ValueError(
                "W&B mode is online but no API key is set: export WANDB_API_KEY (or run "
                "`wandb login`), or use WANDB_MODE=offline and `wandb sync` later"
            )
    checked = cfg
    if args.resume and state.num_checkpoints:  # the run's own checkpoint wins; the initial one is not read
        checked = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_checkpoint=None))
    report = validate_launch_from_env(checked)
    if _rank() == 0 and not quiet:
        print(report.format(), flush=True)


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _report(exc: BaseException, *, debug: bool, status: int | None) -> int:
    """One line on stderr for a user or environment error (`utils/cli.py` decides which is which), plus the
    traceback for bugs (`status` None) or with --debug; returns the exit status. Input errors are the same
    on every rank, so only rank 0 says them; rank-local failures (a full disk, a NaN) are said by each rank
    that hit them, with its rank."""
    from megatron_longgen.utils import cli

    rank = _rank()
    if status == cli.EXIT_USER_ERROR and rank != 0 and not debug:
        return status
    prefix = "longgen-train: error: " if rank == 0 else f"longgen-train: rank {rank}: error: "
    if debug or status is None:
        traceback.print_exception(exc, file=sys.stderr)
    message = cli.describe(exc) if status is not None else f"{type(exc).__name__}: {exc}"
    hint = "" if debug or status is None else " (--debug shows the traceback)"
    print(prefix + message + hint, file=sys.stderr, flush=True)
    return EXIT_FAILURE if status is None else status


def main(argv: list[str] | None = None) -> int:
    from megatron_longgen.utils import cli

    started_unix = time.time()
    args = build_parser().parse_args(argv)
    debug = args.debug or cli.debug_requested([])
    if not debug:  # Megatron-Core's import-time notice, in every process; expected without TE/apex
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        cfg = config_from_args(args)
        preflight(cfg, args, quiet=args.quiet)
    except ValueError as exc:
        return _report(exc, debug=debug, status=cli.EXIT_USER_ERROR)
    from megatron_longgen.training.trainer import train
    from megatron_longgen.utils.distributed import destroy

    try:
        result = train(
            cfg,
            run_dir=args.run_dir,
            quiet=args.quiet,
            resume=args.resume,
            overwrite=args.overwrite,
            allow_changes=tuple(args.allow_change),
            started_unix=started_unix,
        )
    except KeyboardInterrupt:  # a second Ctrl-C: the first one asks for a clean stop (training/guards.py)
        print("longgen-train: interrupted", file=sys.stderr, flush=True)
        return cli.EXIT_INTERRUPTED
    except FloatingPointError as exc:  # the NaN policy stopped the run: a failure, but no bug
        return _report(exc, debug=debug, status=EXIT_FAILURE)
    except Exception as exc:  # noqa: BLE001 - user errors get one line, bugs their traceback
        return _report(exc, debug=debug, status=cli.exit_status(exc))
    finally:
        destroy()
    if result.is_metrics_rank and not args.quiet:
        how = f"stopped by {result.stopped_by}" if result.stopped_by else "done"
        if result.losses:
            first, last = result.losses[0], result.losses[-1]
            change = f"loss {first:.4f} -> {last:.4f}"
            if first > 0:
                drop = (1 - last / first) * 100
                change += f" ({abs(drop):.1f}% {'lower' if drop >= 0 else 'higher'})"
        else:
            change = "no steps to run"
        print(
            f"[longgen] {how}: steps {result.start_step}->{result.final_step}, {change} in "
            f"{result.wall_time_s:.1f} s; checkpoint {result.checkpoint_dir}",
            flush=True,
        )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
