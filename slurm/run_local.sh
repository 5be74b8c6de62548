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
# torchrun answers a signal by stopping its workers and exiting 1 with a traceback, even when every rank
# saved and exited 0. So torchrun runs in its own session (a Ctrl-C in the terminal reaches this script
# only) and SIGTERM / SIGINT / SIGUSR1 go straight to the ranks: they save at the end of their step and
# exit 0, and so does torchrun. A second Ctrl-C makes the ranks abort without saving.
# shellcheck disable=SC2086
setsid python -m torch.distributed.run --standalone --nproc-per-node "$GPUS_PER_NODE" \
  -m megatron_longgen.train --recipe "$RECIPE" --run-dir "$RUN_DIR" $EXTRA_ARGS &
launcher=$!
forward() { pkill "-$1" -P "$launcher" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1
status=0
while true; do
  wait "$launcher" && status=0 || status=$?
  kill -0 "$launcher" 2>/dev/null || break  # wait returned for a trapped signal: keep waiting
done
exit "$status"
