#!/bin/bash
# A real two-node SLURM cluster on this machine (slurmctld + `slurmd -N gfnode1|gfnode2` on 127.0.0.1), to
# try the slurm/ scripts without a cluster. Needs root; installs slurm-wlm and munge with apt if missing.
#
#   eval "$(scripts/slurm_local.sh start)"    # starts it and exports SLURM_CONF for sbatch/srun/squeue
#   scripts/slurm_local.sh status             # daemons and sinfo
#   scripts/slurm_local.sh stop               # cancels its jobs, stops its daemons (by pid)
#
# State (slurm.conf, munge key, spool, logs) lives in $GPTFORGE_SLURM_DIR (default /tmp/gptforge-slurm).
# Each fake node has 1 CPU (--cpus-per-node N for more) and no GPUs: submit with --gpus-per-node=0.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=python3
[ -x "$here/../.venv/bin/python" ] && py="$here/../.venv/bin/python"
exec "$py" "$here/../tests/slurm_cluster.py" "$@"
