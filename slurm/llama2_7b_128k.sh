#!/usr/bin/env bash
# LongGen on Llama-2 7B at 128K: TP=2 x DP=32 = 64 GPUs (8 nodes; the planner's pick for H100-80GB, see
# tools/plan_parallelism.py). More nodes need a larger train.global_batch_size. Submit from the repo root:
#   sbatch slurm/llama2_7b_128k.sh                                  (hybrid, sink + window)
#   RECIPE=llama2_7b_128k_full sbatch slurm/llama2_7b_128k.sh       (the full-attention baseline)
#   EXTRA_ARGS="--init-checkpoint ckpt/llama2-7b-mcore" sbatch slurm/llama2_7b_128k.sh
#   DRY_RUN=1 bash slurm/llama2_7b_128k.sh                           (check the launch here: no sbatch, no GPUs)
# Settings (SIGNAL_LEAD_S, WANDB_*, RUN_DIR, ...), preemption and logs: see slurm/train.sbatch.
#SBATCH --job-name=longgen-7b-128k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
export RECIPE=${RECIPE:-llama2_7b_128k}
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  export NNODES=${NNODES:-8}  # the recipe's layout, whatever allocation a dry run got
else
  export NNODES=${NNODES:-${SLURM_NNODES:-8}}
fi
exec bash "${LONGGEN_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/train.sbatch"
