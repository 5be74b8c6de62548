"""Generate text from an exported LongGen (or plain Llama) folder, streaming tokens to stdout.

    python tools/generate.py --model hf_out --prompt-file prompt.txt [--max-new-tokens 200]
        [--temperature 0.8 --top-p 0.95] [--stop "\\n\\n"] [--kv-policy model] [--tokenizer tok.model]

Greedy by default; `--temperature T > 0` samples (with `--top-p`, `--top-k`). Generation ends at the
tokenizer's end-of-sequence token, at any `--stop` string (not printed) or `--stop-token-id`, or after
`--max-new-tokens`. The prompt is encoded with `<bos>` first. The reduced KV cache is used (the
`--kv-policy` decides what each layer keeps); a summary (tokens, speed, KV-cache bytes per layer kind)
goes to stderr. Errors exit with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megatron_longgen.inference.loading import add_model_args

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-file", help="text file with the prompt ('-' = stdin)")
    prompt.add_argument("--prompt", help="the prompt itself")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable; not printed)")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[], help="extra stop token")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser.parse_args(argv)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    return path.read_text()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        print(f"generate: error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 1
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        print("generate: error: need --temperature >= 0 and 0 < --top-p <= 1", file=sys.stderr)
        return 1
    import torch
    from transformers import StoppingCriteriaList

    from megatron_longgen.inference.loading import load_from_args
    from megatron_longgen.inference.streaming import StopOnStrings, TextStreamer

    try:
        text = read_prompt(args)
        model, tokenizer = load_from_args(args)
    except (ValueError, FileNotFoundError, OSError, ImportError) as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 1
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(text, add_bos=True)], device=device)
    stop_ids = [t for t in [tokenizer.eos_id, *args.stop_token_id] if t is not None and t >= 0]
    sampling = {"do_sample": False}
    if args.temperature > 0:
        sampling = {
            "do_sample": True,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
        }
        torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, stops=args.stop)
    criteria = StoppingCriteriaList(
        [StopOnStrings(tokenizer, args.stop, prompt_len=ids.shape[1])] if args.stop else []
    )
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.max_new_tokens,
        eos_token_id=stop_ids or None,
        pad_token_id=stop_ids[0] if stop_ids else 0,
        streamer=streamer,
        stopping_criteria=criteria,
        return_dict_in_generate=True,
        **sampling,
    )
    seconds = time.perf_counter() - start
    new = out.sequences.shape[1] - ids.shape[1]
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    kv = (
        ", ".join(f"{kind} {n / 2**20:.1f} MiB" for kind, n in cache.nbytes_by_kind().items())
        if cache
        else "-"
    )
    print(
        f"[{ids.shape[1]} prompt tokens, {new} generated in {seconds:.2f} s ({new / seconds:.1f} tok/s); "
        f"layers {model.layer_kinds()}; KV cache {kv}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
