"""What the launcher (torchrun, SLURM's srun, mpirun) told this process, read from its environment.

The one module that parses launcher variables: the trainer, the CLIs and the corpus build all ask here, so a
new launcher is taught in one place. Nothing here starts a process group or touches a device.
"""

from __future__ import annotations

import os

RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")  # torchrun, MPICH, Open MPI, srun
WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # torchrun, Open MPI, MPICH (hydra)
LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
# Variables whose presence (with a size > 1, or PMIx's rank) says mpirun or a multi-task srun step started us.
MPI_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS", "MPI_LOCALNRANKS")


def _first_int(names: tuple[str, ...]) -> int | None:
    for var in names:
        value = os.environ.get(var, "")
        if value.strip().isdigit():
            return int(value)
    return None


def launched_rank() -> int | None:
    """This process's global rank as its launcher set it; None when started alone."""
    return _first_int(RANK_VARS)


def launched_world_size() -> int:
    """World size the launcher announced (torchrun's WORLD_SIZE, or MPI's), 1 for plain `python`."""
    return _first_int(WORLD_SIZE_VARS) or 1


def launched_local_rank() -> int:
    """Rank within this node (0 when started alone)."""
    return _first_int(LOCAL_RANK_VARS) or 0


def launched_local_size() -> int:
    """Processes on this node (1 when started alone)."""
    return _first_int(LOCAL_SIZE_VARS) or 1


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher that sets torch's RANK/WORLD_SIZE contract)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_by_mpi() -> bool:
    """mpirun/mpiexec (MPICH, Open MPI) or a multi-task srun step; plain runs skip MPI."""
    for var in MPI_VARS:
        value = os.environ.get(var)
        if value is not None and (var == "PMIX_RANK" or value.isdigit() and int(value) > 1):
            return True
    return False


def slurm_job_shape() -> tuple[int, int] | None:
    """(world size, GPUs per node) of the SLURM allocation this batch script runs in, before any `srun`:
    nodes x GPUs per node (from SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE, else tasks per node)."""
    nodes = _first_int(("SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
    if nodes is None:
        return None
    per_node = _first_int(("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"))
    if per_node is None:
        tasks = _first_int(("SLURM_NTASKS",))
        per_node = max(1, (tasks or nodes) // nodes)
    return nodes * per_node, per_node
