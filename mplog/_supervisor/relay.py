"""The console relay: lines the listener echoes come back through a pipe and are printed here.

``ConsoleRelay`` owns that pipe. Printing from the main process, rather than from the listener
straight to the terminal, lets the lines cooperate with progress bars (see ``console.emit``).
It prints whole lines only, keeping a partial one until its end arrives.
"""

from __future__ import annotations

import os

from .console import emit

__all__ = ["ConsoleRelay"]


class ConsoleRelay:
    """The console pipe: the listener holds ``write_fd``; the supervisor drains ``read_fd``."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._tail = b""  # the start of a line whose end has not come yet

    def drain(self) -> None:
        """Print every whole line waiting in the pipe."""
        try:
            while True:
                data = os.read(self.read_fd, 65536)
                if not data:
                    break
                data = self._tail + data
                cut = data.rfind(b"\n") + 1
                self._tail = data[cut:]
                if cut:
                    emit(data[:cut].decode("utf-8", "replace"))
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
