#!/usr/bin/env bash
# Same launcher as the Slurm jobs, on this machine: GPUS_PER_NODE ranks with torchrun (gloo on CPU).
#   RECIPE=debug_tiny GPUS_PER_NODE=1 bash slurm/run_local.sh
#   RECIPE=llama2_7b_128k bash slurm/run_local.sh        (one 8-GPU node)
set -euo pipefail
RECIPE=${RECIPE:-debug_tiny}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
RUN_DIR=${RUN_DIR:-runs/$RECIPE}
EXTRA_ARGS=${EXTRA_ARGS:-}
cd "$(dirname "$0")/.."
source slurm/env/${CLUSTER_ENV:-default}.sh
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  # shellcheck disable=SC2086
  exec python tools/check_launch.py --recipe "$RECIPE" --nodes 1 --gpus-per-node "$GPUS_PER_NODE" $EXTRA_ARGS
fi
# shellcheck disable=SC2086
exec python -m torch.distributed.run --standalone --nproc-per-node "$GPUS_PER_NODE" \
  -m megatron_longgen.train --recipe "$RECIPE" --run-dir "$RUN_DIR" $EXTRA_ARGS
