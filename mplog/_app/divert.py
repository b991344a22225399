"""What a process prints on its own stderr when a record cannot go to the files.

``StderrDivert`` writes a record's simplified line (a full ring under ``overflow="stderr"``,
the service stopped, no spool to attach to) and the once-a-second summary of records dropped.
The line is made from the LogRecord itself, and from the message text the handler's formatter
already made, never by decoding the payload made from them: the record is at hand in the
caller, and its payload may be a common record whose message was never rendered.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from . import process as _process
from .._common.record import Record, flatten

__all__ = ["StderrDivert", "stderr_line"]


def stderr_line(record: logging.LogRecord, message: Optional[str] = None) -> str:
    """``record``'s line in the simplified log, as the listener would write it. ``message``:
    the text a formatter set on the handler made of it."""
    # Lazily: a worker that never diverts never loads the listener's formatting.
    from .._common.format import SimplifiedFormatter
    fields, _ = flatten(record, None, message)
    return SimplifiedFormatter().format(Record._make(fields))


class StderrDivert:
    """One channel's lines on stderr: diverted records, and the summary of its drops."""

    def __init__(self, overflow: str) -> None:
        self.overflow = overflow  # named in the summary of drops for want of room
        self._drops_unreported = 0
        self._last_notice = 0.0

    def record(self, record: logging.LogRecord, message: Optional[str], prefix: str) -> None:
        """Print ``record``'s line after ``prefix`` (``[DROPPED] ``, ``[UNDELIVERED] ``, or
        nothing); never raises: stderr itself may be gone, and the record is counted already."""
        try:
            data = (prefix + stderr_line(record, message)).encode("utf-8", "backslashreplace")
            os.write(_process.err_fd(), data)
        except Exception:
            pass

    def note_drop(self, why: str = "") -> None:
        """One drop more; said in one summary a second per process, never a line per record.
        ``why`` (an internal error) is said at once."""
        self._drops_unreported += 1
        now = time.monotonic()
        if now - self._last_notice >= 1.0 or why:
            n, self._drops_unreported = self._drops_unreported, 0
            self._last_notice = now
            reason = why or f"the log spool is full (overflow={self.overflow!r})"
            msg = f"mplog: {n} record(s) dropped by process {os.getpid()}: {reason}\n"
            try:
                os.write(_process.err_fd(), msg.encode("utf-8", "backslashreplace"))
            except OSError:
                pass
