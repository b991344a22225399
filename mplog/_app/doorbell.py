"""The listener's doorbell, as a process that logs rings it.

``Doorbell`` writes one ``K_WAKE`` frame on the service's control FIFO: when a process first
logs (the listener watches it from now, not from its next scan), when it makes its ring, and
when it publishes into a ring while the listener sleeps (every ring was empty). The sleeping
flag is a hint any process may clear, so a stalled listener gets one bell, not one per record.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .._common.counters import FIELDS
from .._common.transport import K_WAKE, FifoWriter

__all__ = ["Doorbell", "SLEEPING"]

SLEEPING = FIELDS.index("sleeping")  # the listener's "every ring was empty" word of the counters


class Doorbell:
    """One process's writer of wake-up frames on the control FIFO, opened on first use."""

    def __init__(self, fifo_path: str) -> None:
        self.fifo_path = fifo_path
        self._writer: Optional[FifoWriter] = None

    def ring(self) -> None:
        """Wake the listener; never raises (no listener: it scans the rings when it starts)."""
        writer = self._writer
        if writer is None:
            try:
                writer = self._writer = FifoWriter(self.fifo_path)
            except OSError:
                return
        try:
            writer.write_record(K_WAKE, b"", 0.0)
        except OSError:
            pass

    def wake(self, words: Any) -> None:
        """The listener sleeps (``words`` are the counters'): clear its flag, then ring once."""
        words[SLEEPING] = 0
        self.ring()

    def after_fork(self) -> None:
        # The writer's frames name their process: a forked child's are its own.
        if self._writer is not None:
            self._writer.pid = os.getpid()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
