#!/usr/bin/env bash
# Creates .venv and installs gptforge into it. Idempotent: a second run with an
# up-to-date .venv (same pyproject.toml and this script) installs nothing.
#
# Order matters: torch is installed first and pinned, so that resolving the
# other dependencies never pulls a multi-GB CUDA build on CPU machines.
# MPI: the `mpich` wheel from PyPI provides the MPI library mpi4py links against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,mpi}

stamp="$VENV/.gptforge-installed"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)-$TORCH_SPEC-$EXTRAS
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "install: $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install --quiet --upgrade pip
$pip install --quiet "$TORCH_SPEC"
# mpich before mpi4py so mpi4py finds the MPI library it ships.
$pip install --quiet mpich
$pip install --quiet -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "install: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
