"""The listener's side of the control protocol with the supervisor (``Control``): frames read
from the control FIFO (``_common.transport``) and the one-byte replies on the reply pipe::

    K_FLUSH   write everything logged before the flush() call, then reply (the flush barrier)
    K_STOP    stop by a deadline; whether the main process holds its threads off its ring
    K_REOPEN  write what is taken, then reopen the files (logrotate)
    K_NOTICE  write one of mplog's own records
    K_WAKE    the spool's doorbell, written by any process: it only wakes the sleeping loop

A reply also tells the supervisor the listener is up. A malformed frame is counted, not fatal.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Callable

from .._common.counters import Counters
from .._common.transport import K_FLUSH, K_NOTICE, K_REOPEN, K_STOP, FrameParser
from .intake import Intake

__all__ = ["Control"]


class Control:
    """What the supervisor asks of this listener, and the stop it asked for."""

    def __init__(self, counters: Counters, intake: Intake, reply_fd: int, reopen: Callable[[], None]) -> None:
        self.counters = counters
        self.intake = intake
        self.reply_fd = reply_fd
        self.reopen = reopen  # the listener's: write what is taken, reopen the files
        self.parser = FrameParser()
        self.stopping = False
        self.owner_quiet = False  # K_STOP said no thread of the main process is publishing
        self.stop_deadline = 0.0
        self._malformed_seen = 0

    def read(self, fd: int) -> None:
        """Every frame the FIFO holds now."""
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                return
            for kind, pid, _tid, _seq, payload in self.parser.feed(data):
                if kind == K_STOP:
                    self.counters.set("stop_pid", pid)  # who asked: see _supervisor._on_exit
                self.on_frame(kind, payload)

    def on_frame(self, kind: int, payload: bytes) -> None:
        c = self.counters
        if kind == K_FLUSH:
            # Everything logged before the flush() call is in a ring now: write it all.
            self.intake.drain(time.monotonic() + 30.0)
            token = struct.unpack("<q", payload[:8])[0] if len(payload) >= 8 else 0
            if token > c.get("flushed_token"):
                c.set("flushed_token", token)
            self.reply()
        elif kind == K_STOP:
            self.stopping = True
            budget = struct.unpack("<d", payload[:8])[0] if len(payload) >= 8 else 1.0
            self.stop_deadline = time.monotonic() + max(0.0, budget)
            # The main process holds its threads off its ring while it stops us (see Shutdown.finish).
            self.owner_quiet = len(payload) > 8 and payload[8] == 1
        elif kind == K_REOPEN:
            self.reopen()
        elif kind == K_NOTICE:
            self.intake.notice(payload.decode("utf-8", "backslashreplace"))
        c.add("malformed", self.parser.malformed - self._malformed_seen)
        self._malformed_seen = self.parser.malformed

    def reply(self) -> None:
        if self.reply_fd >= 0:
            try:
                os.write(self.reply_fd, b"!")
            except OSError:
                pass  # the main process is not reading; it polls the counter too
