"""Passkey retrieval (LongLoRA / Landmark-Attention format) at context lengths x needle depths.

    python tools/eval_passkey.py --model hf_out [--tokenizer tok.model] --lengths 4096,8192,16384,32768
        [--depths 0,0.25,0.5,0.75,1] [--samples 2] [--kv-policy model|full|sink_window|block_strided]

A repeated filler ("The grass is green. The sky is blue. ...") hides "The pass key is 47291. Remember it.
47291 is the pass key." at each depth; the model answers "What is the pass key? The pass key is" by
greedy decoding. Writes OUT_DIR/passkey_KVPOLICY.json (accuracy per length and depth, every sample's
generation, device, versions) and a heat map .png; prints the table. `--kv-policy sink_window` on an
all-F model is the inference-only AttnSink baseline.
"""

import sys

from megatron_longgen.evaluation.cli import run_retrieval

if __name__ == "__main__":
    sys.exit(run_retrieval(None, tool="eval_passkey", tasks={"passkey": "passkey"}, default_task="passkey",
                           default_lengths="1024,2048,4096"))  # fmt: skip
