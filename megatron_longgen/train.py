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
`--resume` continues from the latest complete checkpoint (exactly: same losses as an uninterrupted run);
SIGTERM / SIGUSR1 save a checkpoint at the end of the current step and exit with status 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_longgen.config import SPARSE_VARIANTS, apply_overrides
from megatron_longgen.recipes import RECIPES, get_recipe, with_full_attention, with_sparse_variant


def build_parser(*, run_dir_required: bool = True) -> argparse.ArgumentParser:
    """The `longgen-train` flags (`tools/check_launch.py` reuses them, with `--run-dir` optional)."""
    parser = argparse.ArgumentParser(prog="longgen-train", description="Train a LongGen recipe.")
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="named run (megatron_longgen/recipes.py)")
    parser.add_argument("--run-dir", required=run_dir_required, help="output folder (metrics, config, checkpoints)")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--save-interval", type=int, default=None,
                        help="override train.save_interval (steps between checkpoints; 0: only on exit)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR/checkpoints/latest (a fresh start when there is none)")
    parser.add_argument("--init-checkpoint", default=None, metavar="DIR",
                        help="initial weights: a converted checkpoint folder (override train.init_checkpoint; "
                             "env LONGGEN_INIT_CHECKPOINT)")
    parser.add_argument("--data-blend", default=None, metavar="'PREFIX ...'",
                        help="Megatron indexed datasets to train on: 'PREFIX ...' or 'W PREFIX W PREFIX' "
                             "(data.blend; env LONGGEN_DATA_BLEND)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="SentencePiece .model or HF tokenizer folder (data.tokenizer; env LONGGEN_TOKENIZER)")
    parser.add_argument("--sparse-variant", choices=SPARSE_VARIANTS, default=None, help="sparse pattern of S layers")
    parser.add_argument("--attention", choices=("hybrid", "full"), default="hybrid",
                        help="'full' turns every layer into full attention (the baseline)")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline unless WANDB_MODE=online)")
    parser.add_argument("--override", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="e.g. train.lr=1e-4 model.layer_pattern=SSFFSS")
    parser.add_argument("--quiet", action="store_true", help="no console lines (metrics.jsonl is still written)")
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
    cfg = resolve_inputs(cfg, data_blend=args.data_blend, tokenizer=args.tokenizer,
                         init_checkpoint=args.init_checkpoint)
    cfg = apply_overrides(cfg, overrides)
    if args.wandb:
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb=True))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"longgen-train: error: {exc}", file=sys.stderr)
        return 2
    from megatron_longgen.training.trainer import train
    from megatron_longgen.utils.distributed import destroy

    try:
        result = train(cfg, run_dir=args.run_dir, quiet=args.quiet, resume=args.resume)
    except FloatingPointError as exc:
        print(f"longgen-train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy()
    if result.losses and not args.quiet:
        first, last = result.losses[0], result.losses[-1]
        print(f"[longgen] done: loss {first:.4f} -> {last:.4f} ({(1 - last / first) * 100:.1f}% lower) in "
              f"{result.wall_time_s:.1f} s; checkpoint {result.checkpoint_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
