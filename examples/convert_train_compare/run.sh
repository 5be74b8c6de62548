#!/usr/bin/env bash
# Convert a Hugging Face Llama, train LongGen and its full-attention baseline from it, compare them.
# CPU-sized (the debug_tiny shape, ~2-3 minutes on 2 cores); the same five commands run a real model on GPUs.
#   bash examples/convert_train_compare/run.sh [WORK_DIR] [STEPS]
set -euo pipefail
WORK=${1:-runs/convert_train_compare}
STEPS=${2:-40}
cd "$(dirname "$0")/../.."
mkdir -p "$WORK"

python examples/convert_train_compare/make_hf_llama.py --out "$WORK/hf_llama"
python tools/convert_hf_to_mcore.py --hf-dir "$WORK/hf_llama" --out "$WORK/mcore" --dtype fp32 --force --quiet
longgen-train --recipe debug_tiny --run-dir "$WORK/longgen" --init-checkpoint "$WORK/mcore" \
    --max-steps "$STEPS" --overwrite
longgen-train --recipe debug_tiny --attention full --run-dir "$WORK/full" --init-checkpoint "$WORK/mcore" \
    --max-steps "$STEPS" --overwrite
python tools/compare_runs.py "$WORK/longgen" "$WORK/full" --out "$WORK/report"
