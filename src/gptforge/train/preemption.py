"""Preemption: SIGTERM or SIGUSR1 -> finish the current step, save a checkpoint, exit with EXIT_PREEMPTED.

SLURM sends SIGTERM at preemption and before the time limit (or SIGUSR1 ahead of it with
`#SBATCH --signal=USR1@120`); torchrun forwards SIGTERM to its workers. The handler only sets a flag; the
loop asks `requested()` once per step, and the ranks agree (a signal that reached one rank stops all).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

# 75 = EX_TEMPFAIL (sysexits.h): "temporary failure, try again" -- run again with --resume auto.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning(
                "received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name
            )
        self.signum = signum

    @property
    def received(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
