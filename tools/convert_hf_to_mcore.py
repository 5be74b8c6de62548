"""Convert a Hugging Face Llama checkpoint into a LongGen Megatron-Core checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir Llama-2-7b-hf --out ckpt/l2-7b-longgen --tp 8 --dtype bf16

Writes OUT/longgen_config.json (the full LongGen config: training starts from it with no further
flags) and OUT/model/ (a Megatron-Core dist checkpoint of global tensors, loadable at any TP/PP; the
vocabulary is padded for --tp). `--pattern` takes `default` (LongGen's middle third full; the default
unless the HF config is a LongGen export that records its own), `full` (plain Llama baseline) or an
explicit S/F string. `--override section.field=value ...` sets any other config field (several per
flag, as for the trainer; e.g. `--override sparse.block_size=64 train.seq_length=131072`). The output is
built in OUT.tmp-<host>-<pid>-* and renamed when complete (a killed run's temporary is removed by the
next run); an existing OUT needs --force. A bad input exits with status 2 and a one-line message
(`--debug` or LONGGEN_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from megatron_longgen.utils.atomic_output import remove_stale_dirs
from megatron_longgen.utils.cli import UserError, add_debug_flag, add_override_argument, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megatron_longgen.checkpoint.convert import DEFAULT_MAX_STEPS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf-dir", required=True, help="HF folder with config.json and safetensors/.bin weights"
    )
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size recorded in the config")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size recorded in the config")
    parser.add_argument(
        "--pattern", default=None, help="'default', 'full', or an S/F string (one char per layer)"
    )
    parser.add_argument(
        "--sparse-variant",
        default=None,
        choices=("sink_window", "block_strided"),
        help="sparse variant of the S layers (default: sink_window, or the one a LongGen export records)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bf16", "fp32", "fp16"),
        help="stored dtype (default: the HF config's dtype)",
    )
    parser.add_argument(
        "--seq-length", type=int, default=None, help="train.seq_length (default: max_position_embeddings)"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=DEFAULT_MAX_STEPS,
        help=f"train.max_steps recorded for the trainer (default {DEFAULT_MAX_STEPS})",
    )
    add_override_argument(parser)
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--max-steps", args.max_steps)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.seq_length is not None and args.seq_length < 1:
        raise UserError(f"--seq-length must be >= 1, got {args.seq_length}")
    from megatron_longgen.checkpoint.convert import hf_to_mcore

    for path in remove_stale_dirs(args.out)[0]:
        print(f"convert_hf_to_mcore: removed {path} (left by a killed run)", file=sys.stderr)

    cfg = hf_to_mcore(
        hf_dir=args.hf_dir,
        out_dir=args.out,
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        pattern=args.pattern,
        sparse_variant=args.sparse_variant,
        dtype=args.dtype,
        seq_length=args.seq_length,
        max_steps=args.max_steps,
        overrides=tuple(args.override),
        force=args.force,
        progress=not args.quiet,
    )
    m = cfg.model
    print(
        f"wrote {args.out}: {m.num_layers} layers, pattern {m.layer_pattern}, variant {cfg.sparse.variant}, "
        f"tp {cfg.parallel.tensor_parallel}, pp {cfg.parallel.pipeline_parallel}, dtype {cfg.train.dtype}"
    )
    return 0


if __name__ == "__main__":  # guard required: dist_checkpointing's writer spawns a Manager process
    sys.exit(run_cli(main, prog="convert_hf_to_mcore"))
