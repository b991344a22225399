"""When to restart the listener, and which restarts a listener still has to put in the log.

``RestartPolicy`` decides the delay before the next listener from how the last one ended: a
listener that had come up and was doing its work is replaced at once (a kill from outside, the
OOM killer); one that dies as it starts, or dies without writing what was waiting, is in a crash
loop and gets an exponential backoff. More than ``degraded_restarts`` such restarts in
``window`` s make it *degraded*, at the longest backoff, until a listener stays up that long.

``RestartNotices`` keeps the reasons of the restarts whose notice no listener has written yet,
so that the next listener writes them (a listener killed while starting writes none).

Both are pure: no processes, no clock of their own, tested in-process.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Tuple

__all__ = ["RestartNotices", "RestartPolicy"]

_MAX_LATE = 20  # past this, a storm of listeners killed while starting: the oldest go unnamed


class RestartPolicy:
    """How long to wait before the next listener, from how the last one ended. No processes,
    no clock of its own: the caller passes ``now``, so it is tested in-process."""

    def __init__(self, initial: float, maximum: float, degraded_restarts: int, window: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.degraded_restarts = degraded_restarts
        self.window = window
        self.degraded = False
        self._failures = 0  # consecutive crash-loop exits: drives the backoff
        self._times: Deque[float] = deque()

    def exited(self, now: float, *, ready: bool, progressed: bool) -> float:
        """The listener exited; return the delay before the next one.

        ``ready``: it had come up (files open, spool settled). ``progressed``: it wrote records
        after it came up, or had none to write. A listener that was both was running normally:
        whatever ended it came from outside, and its successor starts at once.
        """
        if ready and progressed:
            return 0.0
        self._times.append(now)
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        self._failures += 1
        if len(self._times) > self.degraded_restarts:
            self.degraded = True
        if self.degraded:
            return self.maximum
        return min(self.maximum, self.initial * 2 ** (self._failures - 1))

    def stable(self, uptime: float) -> bool:
        """A listener that stays up for the longest backoff has recovered: reset. Returns True
        if that ended the degraded state."""
        if (self._failures or self.degraded) and uptime >= self.maximum:
            was = self.degraded
            self._failures = 0
            self._times.clear()
            self.degraded = False
            return was
        return False


class RestartNotices:
    """The reasons of the restarts whose notice no listener has written yet, oldest first."""

    def __init__(self) -> None:
        self._unnoted: List[str] = []
        self._noted = 0  # the listeners' count of written notices when last trimmed

    def add(self, reason: str) -> None:
        self._unnoted.append(reason)

    def late(self, noted: int) -> Tuple[str, ...]:
        """The notices for the next listener to write, given ``noted``, the count the listeners
        have written (the ``restarts_noted`` counter). Call it only when every listener before
        the next is dead, so that count is final: those were the oldest; the others are the
        next one's. (The oldest past ``_MAX_LATE`` go unnamed in the log, but are on stderr.)"""
        del self._unnoted[:max(0, noted - self._noted)]
        del self._unnoted[:-_MAX_LATE]
        self._noted = noted
        return tuple(self._unnoted)
