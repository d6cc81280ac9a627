#!/bin/bash
# Pretrain on 8 nodes x 8 GPUs: one torchrun per node (srun), c10d rendezvous on the first node,
# `--resume auto` always, so a requeued job (same job id) continues from its last complete checkpoint.
#
#   mkdir -p logs && sbatch slurm/pretrain_8node.sh [key.sub=value ...]
#   CONFIG=configs/gpt2-350m.yaml RUN_DIR=runs/350m sbatch --nodes=2 --time=4:00:00 slurm/pretrain_8node.sh
#
# Every #SBATCH value below yields to an sbatch flag (`sbatch --nodes=2`) or its SBATCH_* variable.
# Environment knobs (sbatch passes the submitting shell's environment through):
#   CONFIG          config file, relative to REPO_DIR            (configs/gpt2-1.5b.yaml)
#   RUN_DIR         run directory -> run.dir=                     (the config's run.dir)
#   OVERRIDES       extra key.sub=value overrides, space separated; arguments to this script add more
#   GPUS_PER_NODE   processes per node                           ($SLURM_GPUS_PER_NODE, else 8)
#   DEVICE          cuda | cpu (cpu hides GPUs, one process per GPUS_PER_NODE on CPU, gloo by default)
#   BACKEND         run.dist_backend= override: nccl | gloo      (the config's; gloo when DEVICE=cpu)
#   REPO_DIR        checkout to run from                         ($SLURM_SUBMIT_DIR)
#   PYTHON          interpreter with gptforge installed          (python3)
#   TRAIN_SCRIPT    entry point, relative to REPO_DIR            (launch/train.py)
#   RDZV_PORT       c10d rendezvous port on the first node       (29500)
#   SAVE_TIMEOUT_S  how long torchrun lets the trainer save after a signal before SIGKILL (100)
#   GPU_MEM         memory per GPU the start-up dry run checks the layout against  (80GB)
#   DRY_RUN         1: run launch/train.py --dry-run at the job's shape before srun; 0: skip  (1)
#   SRUN_ARGS       extra srun flags, e.g. pyxis: "--container-image=gptforge.sqsh --container-mounts=..."
#   LAUNCH_PREFIX   command put before python, e.g. "apptainer exec --nv gptforge.sif"
#
# Preemption: `--signal=B:USR1@120` signals this batch shell 120 s before the time limit. The trap forwards
# USR1 to the srun step; srun hands it to torchrun, which forwards it to the trainer (torch >= 2.9 via
# PET_SIGNALS_TO_HANDLE); the trainer saves a checkpoint and exits; then this script requeues the job.
# SIGTERM (scancel, or preemption by the scheduler, which requeues by itself) is forwarded the same way.
#
#SBATCH --job-name=gptforge-pretrain
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
CONFIG=${CONFIG:-configs/gpt2-1.5b.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # SLURM_GPUS_PER_NODE may read "h100:8"
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/train.py}
RDZV_PORT=${RDZV_PORT:-29500}
SAVE_TIMEOUT_S=${SAVE_TIMEOUT_S:-100}
GPU_MEM=${GPU_MEM:-80GB}
DRY_RUN=${DRY_RUN:-1}
read -r -a srun_args <<< "${SRUN_ARGS:-}"
read -r -a launch_prefix <<< "${LAUNCH_PREFIX:-}"
read -r -a overrides <<< "${OVERRIDES:-}"
overrides+=("$@")
[ -n "${RUN_DIR:-}" ] && overrides+=("run.dir=$RUN_DIR")

case "$DEVICE" in
    cuda) ;;
    cpu)
        export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
        BACKEND=${BACKEND:-gloo} ;;
    *) echo "error: DEVICE=$DEVICE: expected cuda or cpu" >&2; exit 2 ;;
esac
[ -n "${BACKEND:-}" ] && overrides+=("run.dist_backend=$BACKEND")

cd "$REPO_DIR"
for f in "$CONFIG" "$TRAIN_SCRIPT"; do
    [ -f "$f" ] || { echo "error: $f not found under REPO_DIR=$REPO_DIR (set REPO_DIR or submit from the checkout)" >&2; exit 2; }
done

nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=$(head -n 1 <<< "$nodes")
nnodes=$(wc -l <<< "$nodes")

# NCCL: warnings only; a failed collective aborts the process (so the job ends and can be requeued)
# instead of hanging until the time limit. Any value already set wins.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# torchrun forwards these signals to the trainer and waits SAVE_TIMEOUT_S for it to save and exit.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SAVE_TIMEOUT_S

echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $GPUS_PER_NODE" \
     "process(es), rendezvous $head_node:$RDZV_PORT, config $CONFIG ${overrides[*]}"

# Every start-up check (config, data manifest, batch plan, layout, memory per GPU) at the job's real shape,
# here on the batch host in seconds, before srun starts a process on any node.
if [ "$DRY_RUN" = 1 ]; then
    "${launch_prefix[@]}" "$PYTHON" launch/train.py --config "$CONFIG" "${overrides[@]}" --dry-run \
        --world-size $((nnodes * GPUS_PER_NODE)) --gpus-per-node "$GPUS_PER_NODE" --gpu-mem "$GPU_MEM" || {
        rc=$?; echo "[$(date -Is)] dry run failed (status $rc): nothing was started" >&2; exit "$rc"; }
fi

srun_pid=""
requeue=0
forward() {  # $1: signal name. Runs while `wait` below is interrupted.
    echo "[$(date -Is)] batch shell got SIG$1: forwarding to the training step"
    [ "$1" = USR1 ] && requeue=1
    [ -n "$srun_pid" ] && kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# One task per node, owning all of its CPUs; --kill-on-bad-exit: one failed node ends the step at once;
# --label: each output line starts with the node index.
srun --nodes="$nnodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 --label \
    "${srun_args[@]}" "${launch_prefix[@]}" "$PYTHON" -m torch.distributed.run \
    --nnodes="$nnodes" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID" \
    --max_restarts=0 \
    "$TRAIN_SCRIPT" --config "$CONFIG" "${overrides[@]}" --resume auto &
srun_pid=$!
[ "$requeue" = 1 ] && kill -s USR1 "$srun_pid"  # the signal came before srun existed

# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until srun is gone.
rc=0
wait "$srun_pid" || rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; do
    rc=0
    wait "$srun_pid" || rc=$?
done
echo "[$(date -Is)] training step exited with status $rc"

if [ "$requeue" = 1 ] && [ "$rc" -ne 0 ]; then
    echo "[$(date -Is)] requeueing job $SLURM_JOB_ID: it resumes from its last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
