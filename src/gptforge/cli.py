"""Shared entry-point behaviour: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from gptforge.errors import GptforgeError

EXIT_USER_ERROR = 2


def rank_prefix() -> str:
    """`[rank R]` when launched by torchrun/SLURM/MPI, so every log line says who speaks."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return f"[rank {os.environ[var]}] "
    return ""


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {rank_prefix()}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a GptforgeError (or a missing file) prints `error: ...` and exits 2.

    `--debug` anywhere in argv keeps the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        code = main(argv)
    except (GptforgeError, FileNotFoundError) as exc:
        if debug:
            raise
        print(f"{rank_prefix()}error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)
