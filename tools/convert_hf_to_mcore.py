"""Convert a Hugging Face Llama checkpoint into a LongGen Megatron-Core checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir Llama-2-7b-hf --out ckpt/l2-7b-longgen --tp 8 --dtype bf16

Writes OUT/longgen_config.json (the full LongGen config: training starts from it with no further
flags) and OUT/model/ (a Megatron-Core dist checkpoint of global tensors, loadable at any TP/PP; the
vocabulary is padded for --tp). `--pattern` takes `default` (LongGen's middle third full; the default
unless the HF config is a LongGen export that records its own), `full` (plain Llama baseline) or an
explicit S/F string. `--override section.field=value` sets any other config field (e.g.
`sparse.block_size=64`, `train.seq_length=131072`). The output is built in OUT.tmp-* and renamed when
complete; an existing OUT needs --force. Errors exit with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys


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
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_longgen.checkpoint.convert import hf_to_mcore

    try:
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
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"convert_hf_to_mcore: error: {err}", file=sys.stderr)
        return 1
    m = cfg.model
    print(
        f"wrote {args.out}: {m.num_layers} layers, pattern {m.layer_pattern}, variant {cfg.sparse.variant}, "
        f"tp {cfg.parallel.tensor_parallel}, pp {cfg.parallel.pipeline_parallel}, dtype {cfg.train.dtype}"
    )
    return 0


if __name__ == "__main__":  # guard required: dist_checkpointing's writer spawns a Manager process
    sys.exit(main())
