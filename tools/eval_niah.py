"""Needle-in-a-haystack (RULER phrasing) in natural text (GNU manual prose shipped with the package).

    python tools/eval_niah.py --model hf_out [--tokenizer tok.model] --lengths 4096,8192,16384,32768
        [--task single|multikey|multivalue] [--needles 4] [--depths ...] [--samples 2] [--kv-policy ...]

single: one needle "One of the special magic numbers for amber-falcon is: 4829173."; multikey: `--needles`
needles with different keys, one asked; multivalue: `--needles` values of one key, all asked (score =
fraction found). Greedy answers; writes OUT_DIR/niah_TASK_KVPOLICY.json and a heat map (length x depth).
"""

import sys

from megatron_longgen.evaluation.cli import run_retrieval

TASKS = {"single": "niah_single", "multikey": "niah_multikey", "multivalue": "niah_multivalue"}

if __name__ == "__main__":
    sys.exit(run_retrieval(None, tool="eval_niah", tasks=TASKS, default_task="single",
                           default_lengths="1024,2048,4096"))  # fmt: skip
