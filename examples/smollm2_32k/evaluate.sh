#!/usr/bin/env bash
# Step 5: passkey, needle-in-a-haystack and perplexity by position for each model, with the project's
# evaluation tools (tools/eval_passkey.py, tools/eval_niah.py, tools/eval_ppl_by_position.py).
#
#   bash examples/smollm2_32k/evaluate.sh                          # every model that exists
#   bash examples/smollm2_32k/evaluate.sh longgen full attnsink_inference
#
# Models: original (the converted SmolLM2, 8K), longgen, sparse_only, full (exports of the trained runs),
# attnsink_inference (the `full` export with the sink_window KV policy at inference only: the paper's
# inference-only AttnSink baseline). Writes WORKDIR/eval/MODEL/{passkey,niah,ppl}.json (+ the tools' PNGs).
# Sizes (environment): LENGTHS, DEPTHS (space-separated), SAMPLES (passkey and NIAH trials per cell), PPL_DOCS,
# PPL_LENGTH, PPL_BIN (positions per point of the perplexity curve).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORKDIR=${WORKDIR:-$REPO/runs/smollm2_32k}
PYTHON=${PYTHON:-python3}
LENGTHS=${LENGTHS:-4096 8192 16384 32768 65536}
DEPTHS=${DEPTHS:-0.0 0.25 0.5 0.75 1.0}
SAMPLES=${SAMPLES:-2}
PPL_DOCS=${PPL_DOCS:-4}
PPL_LENGTH=${PPL_LENGTH:-65536}
DTYPE=${DTYPE:-bf16}
PPL_BIN=${PPL_BIN:-1024}
lengths=$(echo $LENGTHS | tr ' ' ',')  # the tools take comma-separated lists
depths=$(echo $DEPTHS | tr ' ' ',')
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(original longgen sparse_only full attnsink_inference)

for model in "${MODELS[@]}"; do
    case "$model" in
        attnsink_inference) dir=$WORKDIR/hf/full; policy=(--kv-policy sink_window) ;;
        original|longgen|sparse_only|full) dir=$WORKDIR/hf/$model; policy=() ;;
        *) echo "evaluate.sh: unknown model '$model'" >&2; exit 2 ;;
    esac
    if [ ! -f "$dir/config.json" ]; then echo "evaluate.sh: skipping $model ($dir missing)"; continue; fi
    out=$WORKDIR/eval/$model
    mkdir -p "$out"
    echo "evaluate.sh: $model ($dir ${policy[*]})"
    "$PYTHON" "$REPO/tools/eval_passkey.py" --model "$dir" "${policy[@]}" --lengths "$lengths" --depths "$depths" \
        --samples "$SAMPLES" --dtype "$DTYPE" --out-dir "$out" --name passkey --label "$model"
    "$PYTHON" "$REPO/tools/eval_niah.py" --model "$dir" "${policy[@]}" --lengths "$lengths" --depths "$depths" \
        --samples "$SAMPLES" --dtype "$DTYPE" --out-dir "$out" --name niah --label "$model"
    "$PYTHON" "$REPO/tools/eval_ppl_by_position.py" --model "$dir" "${policy[@]}" \
        --documents "$WORKDIR/data/heldout.jsonl" --num-docs "$PPL_DOCS" --max-tokens "$PPL_LENGTH" \
        --bin-size "$PPL_BIN" --dtype "$DTYPE" --out-dir "$out" --name ppl --label "$model"
done
