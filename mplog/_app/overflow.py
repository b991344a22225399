"""The overflow policy: what a process does with a record for which its ring has no room.

``Overflow`` turns ``overflow=`` into an answer per record: drop it (``"drop"``, and
``"stderr"``, whose drop the caller also prints), wait for room as long as the service runs
(``"block"``), or wait once per episode of a full ring, at most ``overflow_timeout`` seconds,
then drop without waiting until a record fits again (``"timeout"``). Waiting is for the
listener to commit a batch, so it polls the ring with a growing pause.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from .._common.counters import STATE_STOPPED

__all__ = ["Overflow"]


class Overflow:
    """The policy of one channel, and the state of its current episode of a full ring."""

    def __init__(self, policy: str, timeout: float) -> None:
        self.policy = policy
        self.timeout = timeout
        # overflow="timeout": this episode's one wait is spent; records drop without waiting
        # (and the compiled publish() stays held, see Channel._unhold) until one fits again.
        self.episode = False

    def room_again(self) -> None:
        """A record fitted: the next full ring may wait once more."""
        self.episode = False

    def wait(self, write: Callable[[], bool], words: Any, bell: Callable[[], None]) -> Optional[bool]:
        """The ring is full (or has no room to be made). ``write`` tries again; ``words`` are
        the counters' (the service's state); ``bell`` wakes the listener. True: written after a
        wait; False: drop; None: the service is gone."""
        policy = self.policy
        if policy == "drop" or policy == "stderr":
            return False
        if policy == "timeout":
            if self.episode:  # one wait per overflow episode, then drops without waiting
                return False
            deadline: Optional[float] = time.monotonic() + self.timeout
        else:
            deadline = None
        bell()
        pause = 0.0002
        while True:
            if write():
                return True
            if words[1] == STATE_STOPPED:
                return None
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.episode = True
                return False
            left = 0.01 if deadline is None else max(0.0, deadline - now)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.01)
