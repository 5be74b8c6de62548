#!/usr/bin/env bash
# Step 4: the latest checkpoint of a trained variant -> a Hugging Face folder (LongGen layout recorded, weights
# in the dtype they were trained in: bf16 for the recipes) with the tokenizer, for the evaluation tools.
#
#   bash examples/smollm2_32k/export.sh longgen          # -> WORKDIR/hf/longgen
set -euo pipefail
VARIANT=${1:?usage: export.sh longgen|sparse_only|full}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORKDIR=${WORKDIR:-$REPO/runs/smollm2_32k}
PYTHON=${PYTHON:-python3}
CKPTS=$WORKDIR/train/$VARIANT/checkpoints
[ -f "$CKPTS/latest" ] || { echo "export.sh: no checkpoint in $CKPTS (train first)" >&2; exit 1; }
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" "$REPO/tools/convert_mcore_to_hf.py" --mcore-dir "$CKPTS/$(cat "$CKPTS/latest")" \
    --out "$WORKDIR/hf/$VARIANT" --force --quiet
# The converter writes weights and config only; the tokenizer is the original model's.
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
    if [ -f "$WORKDIR/hf/original/$f" ]; then cp "$WORKDIR/hf/original/$f" "$WORKDIR/hf/$VARIANT/"; fi
done
