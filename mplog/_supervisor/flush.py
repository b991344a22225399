"""The flush barrier: ``LogService.flush()`` waits here until the listener has written a token.

``FlushBarrier`` owns the reply pipe. The listener writes a byte to it when it is ready and each
time it has written a flush marker (and set ``flushed_token`` in the shared counters); the
supervisor's thread drains the pipe and wakes the waiters, which compare the counter with their
token. A marker can die with a listener, so a waiter sends its marker again after each restart.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from .._common.counters import Counters

__all__ = ["FlushBarrier", "drain_pipe"]

_RECHECK = 0.1  # a waiter looks at the restart count at least this often


def drain_pipe(fd: int) -> None:
    """Read a non-blocking pipe empty: its bytes are wake-ups, not data."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class FlushBarrier:
    """The reply pipe and the condition that flush waiters sleep on."""

    def __init__(self, counters: Counters, lock: "threading.RLock") -> None:
        self.counters = counters
        # On the supervisor's lock: a waiter never reads the restart count halfway through a
        # restart, and resends its marker with no restart under way.
        self._cond = threading.Condition(lock)
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def drain(self) -> None:
        """The listener replied: empty the pipe and wake every waiter to look at its token."""
        drain_pipe(self.read_fd)
        with self._cond:
            self._cond.notify_all()

    def wait(self, token: int, deadline: float, resend: Callable[[], object],
             restarts: Callable[[], int]) -> bool:
        """Wait until the listener has written ``token`` or ``deadline`` has passed; call
        ``resend`` each time ``restarts()`` has moved (the marker may have died with a listener)."""
        generation = restarts()
        with self._cond:
            while self.counters.get("flushed_token") < token:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if restarts() != generation:
                    generation = restarts()
                    resend()
                self._cond.wait(min(left, _RECHECK))
        return True

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
