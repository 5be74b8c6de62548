#!/usr/bin/env bash
# LongGen on Llama-2 7B at 128K (paper scale: 256 GPUs, TP=8, DP=32). Submit from the repo root:
#   sbatch slurm/llama2_7b_128k.sh                                  (hybrid, sink + window)
#   RECIPE=llama2_7b_128k_full sbatch slurm/llama2_7b_128k.sh       (the full-attention baseline)
#   EXTRA_ARGS="--init-checkpoint ckpt/llama2-7b-mcore" sbatch slurm/llama2_7b_128k.sh
#   DRY_RUN=1 bash slurm/llama2_7b_128k.sh                           (check the launch here: no sbatch, no GPUs)
# Settings (SIGNAL_LEAD_S, WANDB_*, RUN_DIR, ...), preemption and logs: see slurm/train.sbatch.
#SBATCH --job-name=longgen-7b-128k
#SBATCH --nodes=32
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
  export NNODES=${NNODES:-32}  # the recipe's layout, whatever allocation a dry run got
else
  export NNODES=${NNODES:-${SLURM_NNODES:-32}}
fi
exec bash "${LONGGEN_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/train.sbatch"
