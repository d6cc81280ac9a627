"""Shared entry-point behaviour: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.launcher import launched_rank

EXIT_USER_ERROR = 2


def rank_prefix() -> str:
    """`[rank R]` when launched by torchrun/SLURM/MPI, so every log line says who speaks."""
    rank = launched_rank()
    return "" if rank is None else f"[rank {rank}] "


def setup_rank_logging(quiet: bool = False) -> None:
    """INFO on rank 0 (WARNING with `quiet`, e.g. when stdout is JSON), WARNING on the other ranks."""
    setup_logging(logging.INFO if not quiet and (launched_rank() or 0) == 0 else logging.WARNING)


def quiet_deepspeed() -> None:
    """Call before DeepSpeed is first imported: name its CPU accelerator where there is no GPU (instead of
    DeepSpeed warning that it guessed), keep its logger to warnings, and hide the FutureWarning its ZeRO
    code raises in torch.distributed (a renamed torch function: not the user's business)."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {rank_prefix()}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def parse_args_anywhere(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with `section.key=value` overrides allowed before, between and after the options (argparse's
    plain `parse_args` stops collecting a `nargs="*"` positional at the first option after it)."""
    return parser.parse_intermixed_args(argv)


def output_dir(path: str, overwrite: bool) -> Path:
    """`--output` of a tool that writes a directory: an existing non-empty one is only written into
    with `--overwrite`, so no earlier result is lost by accident."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise GptforgeError(
            f"--output {out} exists and is not empty: choose another directory or pass --overwrite"
        )
    return out


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
