"""Perplexity by token position on long held-out documents (does the model use distant context?).

    python tools/eval_ppl_by_position.py --model hf_out [--tokenizer tok.model] [--documents a.txt b.jsonl]
        [--max-tokens 32768] [--num-docs 4] [--bin-size 1024] [--kv-policy ...] [--overlay other.json ...]

Documents: text files (one document each), .jsonl files (`text` field), or builtin:haystack (default: the
shipped GNU-manual prose, not in any training set of the project). Writes OUT_DIR/ppl_KVPOLICY.json (mean
NLL and perplexity per position bin) and a curve .png (with `--overlay` results of other runs).
"""

import sys

from megatron_longgen.evaluation.cli import run_perplexity

if __name__ == "__main__":
    sys.exit(run_perplexity(None))
