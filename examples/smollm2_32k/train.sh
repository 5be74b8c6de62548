#!/usr/bin/env bash
# Step 3: continue training the converted SmolLM2 at 32K as one variant, with this project's trainer.
#
#   bash examples/smollm2_32k/train.sh longgen            # or sparse_only, full
#   OVERRIDES="train.lr=2e-4 model.rotary_base=2000000" bash examples/smollm2_32k/train.sh full --max-steps 30
#
# Recipe smollm2_32k_VARIANT (megatron_longgen/recipes.py): same tokens, seed and LR schedule for all three.
# Extra arguments go to longgen-train (`python -m megatron_longgen.train`); config overrides go in
# OVERRIDES (longgen-train takes one --override list, which also carries the data paths below). Writes WORKDIR/train/VARIANT/{metrics.jsonl,config.json,checkpoints/}
# and process_time.json (the whole process: start-up, training, checkpoint).
set -euo pipefail
VARIANT=${1:?usage: train.sh longgen|sparse_only|full [longgen-train arguments]}
shift
case "$VARIANT" in longgen|sparse_only|full) ;; *) echo "train.sh: unknown variant '$VARIANT'" >&2; exit 2;; esac
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORKDIR=${WORKDIR:-$REPO/runs/smollm2_32k}
PYTHON=${PYTHON:-python3}
RUN_DIR=$WORKDIR/train/$VARIANT
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$RUN_DIR"
start=$(date +%s%N)
"$PYTHON" -m megatron_longgen.train --recipe "smollm2_32k_$VARIANT" --run-dir "$RUN_DIR" \
    --init-checkpoint "$WORKDIR/mcore/original" "$@" \
    --override "data.blend=$WORKDIR/data/train" "data.tokenizer=$WORKDIR/hf/original" ${OVERRIDES:-}
ms=$(( ($(date +%s%N) - start) / 1000000 ))
printf '{"variant": "%s", "process_wall_s": %d.%03d}\n' "$VARIANT" $((ms / 1000)) $((ms % 1000)) \
    > "$RUN_DIR/process_time.json"
