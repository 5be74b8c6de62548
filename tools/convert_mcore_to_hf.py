"""Convert a LongGen Megatron-Core checkpoint (saved at any TP/PP) into a Hugging Face folder.

    python tools/convert_mcore_to_hf.py --mcore-dir ckpt/llama2-7b-longgen --out llama2-7b-longgen-hf

Writes safetensors shards (`--max-shard-gb`, default 5) and a `config.json` with `model_type:
longgen_llama` and a `longgen` section (per-layer full/sparse pattern, variant, block, sink, window,
stride). Load it with `megatron_longgen.checkpoint.hf_model.LongGenLlamaForCausalLM.from_pretrained(OUT)`,
which applies the sparse masks. The vocabulary padding is stripped. The output is built in OUT.tmp-* and
renamed when complete; an existing OUT needs --force. Errors exit with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mcore-dir", required=True, help="checkpoint folder with longgen_config.json and model/"
    )
    parser.add_argument("--out", required=True, help="output HF folder")
    parser.add_argument(
        "--dtype", default=None, choices=("bf16", "fp32", "fp16"), help="output dtype (default: as stored)"
    )
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_longgen.checkpoint.convert import mcore_to_hf

    if args.max_shard_gb <= 0:
        print(
            f"convert_mcore_to_hf: error: --max-shard-gb must be > 0, got {args.max_shard_gb}",
            file=sys.stderr,
        )
        return 1
    try:
        hf_config = mcore_to_hf(
            mcore_dir=args.mcore_dir,
            out_dir=args.out,
            dtype=args.dtype,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            force=args.force,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"convert_mcore_to_hf: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: layer_pattern {hf_config['longgen']['layer_pattern']}, dtype {hf_config['dtype']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
