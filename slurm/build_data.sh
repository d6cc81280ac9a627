#!/usr/bin/env bash
# Build a tokenized corpus across SLURM nodes: one MPI rank per task (mpi4py over srun's PMI), each rank
# running --workers processes. Ranks split the input files, deduplicate sharded (hashes and LSH band keys go to
# their owner ranks), and every rank writes its own shards; rank 0 writes the manifest last.
# The output directory (and --tmp-dir, if given) must be on a filesystem every node sees: it holds the ranks'
# temporary files, which the other ranks read. --memory-per-rank caps each rank (default: half the node's memory
# divided by the ranks on it); past it the dedup stages spill to disk.
#
#   sbatch slurm/build_data.sh --input /data/raw --output /data/tokens [more build.py options]
#   INPUT="/data/raw /data/more" OUTPUT=/data/tokens sbatch --nodes=8 slurm/build_data.sh
#
# Every #SBATCH value below is a default: sbatch flags (--nodes=8) or SBATCH_* variables override it.
# Environment overrides: GPTFORGE_ROOT (repository; default: the submit directory), PYTHON (default: the
# repository's .venv), WORKERS (default: SLURM_CPUS_PER_TASK), SRUN_MPI (srun's --mpi plugin, default pmi2),
# INPUT / OUTPUT / BUILD_ARGS (extra options). Arguments after the script name go to build.py last and win.
#
#SBATCH --job-name=gptforge-build-data
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

ROOT=${GPTFORGE_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}
SRUN_MPI=${SRUN_MPI:-pmi2}
# The mpich wheel's UCX netmod publishes worker addresses longer than SLURM pmi2's value limit once two or
# more ranks share a node (seen: "mpi/pmi2: value not properly terminated", then a UCX address assertion);
# its OFI netmod's addresses fit. The build's MPI traffic is small, so the transport costs nothing here.
# A value already set (e.g. a site MPI's) wins.
export MPIR_CVAR_CH4_NETMOD=${MPIR_CVAR_CH4_NETMOD:-ofi}

args=(--workers "$WORKERS")
if [ -n "${INPUT:-}" ]; then
    read -r -a inputs <<< "$INPUT"
    args+=(--input "${inputs[@]}")
fi
[ -n "${OUTPUT:-}" ] && args+=(--output "$OUTPUT")
if [ -n "${BUILD_ARGS:-}" ]; then
    read -r -a extra <<< "$BUILD_ARGS"
    args+=("${extra[@]}")
fi

echo "build_data: $(date -Is) nodes=${SLURM_JOB_NUM_NODES:-?} tasks=${SLURM_NTASKS:-?} workers/rank=$WORKERS root=$ROOT"
exec srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 "$PYTHON" data_pipeline/build.py "${args[@]}" "$@"
