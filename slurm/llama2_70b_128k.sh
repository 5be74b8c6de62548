#!/usr/bin/env bash
# LongGen on Llama-2 70B (GQA 64/8) at 128K: TP=8 x CP=8 = 64 GPUs (8 nodes, DP=1; the planner's pick for
# H100-80GB, see tools/plan_parallelism.py); --nodes=32 gives DP=4 (needs a larger global_batch_size
# for more than 32 nodes). Submit from the repo root:
#   sbatch slurm/llama2_70b_128k.sh
#   RECIPE=llama2_70b_128k_full sbatch slurm/llama2_70b_128k.sh     (the full-attention baseline)
#   DRY_RUN=1 bash slurm/llama2_70b_128k.sh                           (check the launch here: no sbatch, no GPUs)
# Settings (SIGNAL_LEAD_S, WANDB_*, RUN_DIR, ...), preemption and logs: see slurm/train.sbatch.
#SBATCH --job-name=longgen-70b-128k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@360
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
export RECIPE=${RECIPE:-llama2_70b_128k}
# A 70B step (~2 min on 64 H100s) plus a checkpoint save (~100 s at 10 GB/s) needs more than the default
# 180 s between the warning and the limit: tools/plan_parallelism.py predicts ~216 s.
export SIGNAL_LEAD_S=${SIGNAL_LEAD_S:-360}
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  export NNODES=${NNODES:-8}  # the recipe's layout, whatever allocation a dry run got
else
  export NNODES=${NNODES:-${SLURM_NNODES:-8}}
fi
exec bash "${LONGGEN_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/train.sbatch"
