#!/bin/bash
# Entry point of the gptforge image: the first argument names a launch script, the rest are its arguments.
#   train ARGS                -> torchrun --standalone --nproc_per_node=$NPROC_PER_NODE launch/train.py ARGS
#   finetune ARGS             -> the same for launch/finetune.py
#   generate|export|eval|plan|convert_checkpoint ARGS -> python launch/<name>.py ARGS
#   build-data ARGS           -> python data_pipeline/build.py ARGS (add `mpirun -n N` yourself for MPI)
#   anything else             -> run as given (torchrun ..., bash, python ...), e.g. under srun/pyxis
set -euo pipefail
home=${GPTFORGE_HOME:-/opt/gptforge}
cmd=${1:---help}
[ "$#" -gt 0 ] && shift

case "$cmd" in
    train|finetune)
        exec python -m torch.distributed.run --standalone --nproc_per_node="${NPROC_PER_NODE:-1}" \
            "$home/launch/$cmd.py" "$@" ;;
    generate|export|eval|plan|convert_checkpoint)
        exec python "$home/launch/$cmd.py" "$@" ;;
    build-data|build_data)
        exec python "$home/data_pipeline/build.py" "$@" ;;
    -h|--help|help)
        sed -n '2,7s/^# \{0,1\}//p' "$0"
        echo "files: $home (configs/, slurm/), runs go to the working directory (/workspace)" ;;
    *)
        exec "$cmd" "$@" ;;
esac
