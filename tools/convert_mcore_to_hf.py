"""Convert a LongGen Megatron-Core checkpoint (saved at any TP/PP) into a Hugging Face folder.

    python tools/convert_mcore_to_hf.py --mcore-dir ckpt/llama2-7b-longgen --out llama2-7b-longgen-hf

Writes safetensors shards (`--max-shard-gb`, default 5), a `config.json` with `model_type:
longgen_llama` and a `longgen` section (per-layer full/sparse pattern, variant, block, sink, window,
stride), and the tokenizer files, so `AutoTokenizer.from_pretrained(OUT)` works: the training config's
`data.tokenizer` (a SentencePiece .model becomes `tokenizer.model` + a LlamaTokenizer config; an HF
tokenizer folder is copied), or `--tokenizer PATH`; a warning says when none can be written. Load the
model with `megatron_longgen.checkpoint.hf_model.LongGenLlamaForCausalLM.from_pretrained(OUT)`, which
applies the sparse masks. The vocabulary padding is stripped. The output is built in
OUT.tmp-<host>-<pid>-* and renamed when complete (a killed run's temporary is removed by the next run);
an existing OUT needs --force. A bad input exits with status 2 and a one-line message (`--debug` or
LONGGEN_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from megatron_longgen.utils.atomic_output import remove_stale_dirs
from megatron_longgen.utils.cli import UserError, add_debug_flag, run_cli


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
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="SentencePiece .model or HF tokenizer folder to include (default: the config's data.tokenizer)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.max_shard_gb > 0:
        raise UserError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    from megatron_longgen.checkpoint.convert import mcore_to_hf

    for path in remove_stale_dirs(args.out)[0]:
        print(f"convert_mcore_to_hf: removed {path} (left by a killed run)", file=sys.stderr)

    hf_config = mcore_to_hf(
        mcore_dir=args.mcore_dir,
        out_dir=args.out,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        tokenizer=args.tokenizer,
        force=args.force,
        progress=not args.quiet,
        on_warning=lambda text: print(f"convert_mcore_to_hf: warning: {text}", file=sys.stderr, flush=True),
    )
    print(
        f"wrote {args.out}: layer_pattern {hf_config['longgen']['layer_pattern']}, dtype {hf_config['dtype']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="convert_mcore_to_hf"))
