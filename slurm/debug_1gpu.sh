#!/bin/bash
# One GPU, short time limit: try a config or a code change before spending a multi-node allocation.
#
#   mkdir -p logs && sbatch slurm/debug_1gpu.sh [key.sub=value ...]
#   CONFIG=configs/gpt2-124m.yaml bash slurm/debug_1gpu.sh train.max_steps=20    # outside SLURM: runs here
#
# Environment: CONFIG (configs/tiny.yaml), RUN_DIR (-> run.dir=), OVERRIDES, DEVICE=cuda|cpu, REPO_DIR
# ($SLURM_SUBMIT_DIR), PYTHON (python3), TRAIN_SCRIPT (launch/train.py); #SBATCH values yield to sbatch flags.
#
#SBATCH --job-name=gptforge-debug
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
CONFIG=${CONFIG:-configs/tiny.yaml}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/train.py}
read -r -a overrides <<< "${OVERRIDES:-}"
overrides+=("$@")
[ -n "${RUN_DIR:-}" ] && overrides+=("run.dir=$RUN_DIR")
case "$DEVICE" in
    cuda) ;;
    cpu) export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu ;;
    *) echo "error: DEVICE=$DEVICE: expected cuda or cpu" >&2; exit 2 ;;
esac

cd "$REPO_DIR"
launcher=()
[ -n "${SLURM_JOB_ID:-}" ] && launcher=(srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
# --standalone: a private rendezvous on a free local port, so debug jobs sharing a node never collide.
exec "${launcher[@]}" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
    "$TRAIN_SCRIPT" --config "$CONFIG" "${overrides[@]}" --resume auto
