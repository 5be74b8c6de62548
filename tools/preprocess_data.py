"""Tokenize text into a Megatron-Core indexed dataset for LongGen training.

    python tools/preprocess_data.py --input a.jsonl b.jsonl --tokenizer builtin:tiny_sp \\
        --output-prefix data/slimpj --workers 8
    # long-context mixing (Fu et al. 2024): up-weight >=4K-token documents 3x, keep short ones with p=0.1,
    # keep each source's share of tokens (source = the jsonl field meta.redpajama_set_name)
    python tools/preprocess_data.py --input slimpj/*.jsonl --tokenizer /models/llama2/tokenizer.model \\
        --output-prefix data/slimpj_long --workers 16 --source-key meta.redpajama_set_name \\
        --long-threshold 4096 --long-weight 3 --short-weight 0.1 --target-tokens 5000000000

Inputs: `.jsonl` (text under `--text-key`), `.txt` (blank-line separated documents), both optionally
`.gz` or `.zst` (needs zstandard) compressed, and `.parquet` (needs pyarrow). Writes PREFIX.bin and
PREFIX.idx (atomically: temporary names renamed at the end) and PREFIX.stats.json (per-source documents,
tokens, long-token fractions and shares, before and after). Each document starts with <bos>. Train on the
result with `DataConfig(blend="PREFIX")`. An existing PREFIX.bin/.idx needs --force (as for the converters);
the temporary files of a killed earlier run into the same prefix are removed first. Exits with status 2
and a one-line message on bad input (`--debug` or LONGGEN_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_longgen.data.length_sampling import LengthSampling
from megatron_longgen.data.preprocess import preprocess
from megatron_longgen.utils.atomic_output import remove_stale_dataset_temps
from megatron_longgen.utils.cli import add_debug_flag, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input", nargs="+", required=True, help=".jsonl / .txt (optionally .gz / .zst) / .parquet files"
    )
    p.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model, HF tokenizer folder, or builtin:tiny_sp"
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--text-key", default="text", help="JSON key / parquet column holding the text")
    p.add_argument(
        "--source-key",
        default=None,
        help="dotted JSON key / column naming each document's source (default: the file name)",
    )
    p.add_argument("--long-threshold", type=int, default=4096, help="tokens from which a document is long")
    p.add_argument("--long-weight", type=float, default=1.0, help="relative weight of long documents")
    p.add_argument("--short-weight", type=float, default=1.0, help="relative weight of short documents")
    p.add_argument(
        "--no-keep-source-shares",
        action="store_true",
        help="do not rescale sources back to their input token shares",
    )
    p.add_argument("--target-tokens", type=int, default=None, help="expected total output tokens")
    p.add_argument("--seed", type=int, default=1234, help="seed of the length-sampling draw")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin/.idx")
    add_debug_flag(p)
    return p.parse_args(argv)


def check_output(prefix: str, *, force: bool) -> None:
    """Refuse to replace an existing dataset without --force; remove what killed runs left behind."""
    existing = [prefix + ext for ext in (".bin", ".idx") if os.path.exists(prefix + ext)]
    if existing and not force:
        raise FileExistsError(f"output {' and '.join(existing)} already exists; pass --force to replace it")
    for path in remove_stale_dataset_temps(prefix):
        print(f"preprocess_data.py: removed {path} (left by a killed run)", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    """Run the CLI; returns the stats dict written to PREFIX.stats.json. Raises ValueError on bad input."""
    args = parse_args(argv)
    check_output(args.output_prefix, force=args.force)
    sampling = LengthSampling(
        long_threshold=args.long_threshold,
        long_weight=args.long_weight,
        short_weight=args.short_weight,
        keep_source_shares=not args.no_keep_source_shares,
        target_tokens=args.target_tokens,
    )
    stats = preprocess(
        inputs=args.input,
        tokenizer=args.tokenizer,
        output_prefix=args.output_prefix,
        workers=args.workers,
        text_key=args.text_key,
        source_key=args.source_key,
        sampling=sampling,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats['documents_out']} documents, "
        f"{stats['tokens_out']} tokens ({stats['documents_in']} documents, {stats['tokens_in']} tokens in); "
        f"stats in {args.output_prefix}.stats.json"
    )
    return stats


def cli(argv: list[str]) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(cli, prog="preprocess_data.py"))
