"""Opt-in capture of a worker's stdout and stderr (``capture_output=True``): each line a record.

The process's fd 1 and fd 2 are pointed at two FIFOs in the spool, ``out.<slot>`` and
``err.<slot>``, so ``print()``, C code and child programs all write there. A thread of the
process reads them, passes every byte on to where the output went before (nothing disappears
from the terminal or the batch job's output file), and logs each line: logger ``stdout`` at INFO,
``stderr`` at WARNING, attributed to the process. ``sys.stdout`` becomes line-buffered, so a line
is in the pipe when ``print()`` returns.

Why FIFOs in the spool rather than anonymous pipes: the listener opens a read end of each too,
and reads nothing while the process lives. If the process dies abruptly, what the thread had
not read yet (the last words of a crash: a C library's message before ``abort()``) is still in
the FIFO, and the listener writes it. The process holds its own read end, so no writer ever gets
EPIPE, whether the listener is running, restarting or gone.

Backpressure: a pipe holds 64 KiB. While the thread is behind (its records wait for room in
the ring under ``overflow="block"``), writes to fd 1 and 2 wait, as on a slow terminal; with
``drop`` the lines are dropped and counted instead. At a normal exit the exit hook flushes
``sys.stdout`` and ``sys.stderr``, gives fd 1 and 2 back, and the thread logs what is left, a
last line without its newline included.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import sys
import threading
from typing import List, Optional, Tuple

from .._common.spool import MAX_LINE, STREAMS

__all__ = ["Capture", "MAX_LINE", "STREAMS"]

_PARTIAL_WAIT_MS = 500  # a line still without its newline after this is logged as it is


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


class _Stream:
    def __init__(self, fd: int, read_fd: int, saved: int, logger: str, level: int) -> None:
        self.fd = fd
        self.read_fd = read_fd
        self.saved = saved  # where this output went before (-1: it was closed)
        self.logger = logging.getLogger(logger)
        self.name = logger
        self.level = level
        self.partial = b""


class Capture:
    """This process's fd 1 and 2 captured into FIFOs of the spool, read by a thread."""

    def __init__(self, runtime: str, index: int) -> None:
        self.pid = os.getpid()
        self.paths: List[str] = []
        self.streams: List[_Stream] = []
        writers: List[Tuple[int, int]] = []
        try:
            for fd, tag, logger, level in STREAMS:
                path = os.path.join(runtime, f"{tag}.{index}")
                os.mkfifo(path, 0o600)
                self.paths.append(path)
                r = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    saved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                except OSError:
                    saved = -1
                self.streams.append(_Stream(fd, r, saved, logger, level))
                writers.append((fd, os.open(path, os.O_WRONLY | os.O_CLOEXEC)))  # a reader exists: no wait
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            for _fd, w in writers:
                os.close(w)
            self._close_own()
            raise
        self._stopping = False
        _flush_python_streams()  # what was printed before goes where it always went
        for fd, w in writers:
            os.dup2(w, fd)  # inheritable: child programs write here too
            os.close(w)
        try:
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except Exception:
            pass
        self.thread = threading.Thread(target=self._run, name="mplog-capture", daemon=True)
        self.thread.start()

    @property
    def saved_err(self) -> int:
        return self.streams[1].saved if len(self.streams) > 1 and self.streams[1].saved >= 0 else 2

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        poller = select.poll()
        by_fd = {s.read_fd: s for s in self.streams}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            waiting = any(s.partial for s in self.streams)
            try:
                events = poller.poll(_PARTIAL_WAIT_MS if waiting else None)
            except OSError:
                break
            if not events:  # a partial line has waited long enough: log it as it is
                for s in self.streams:
                    self._flush_partial(s)
            for fd, _ev in events:
                ready = by_fd.get(fd)
                if ready is not None:
                    self._read(ready)
        for s in self.streams:  # stopping: what is left, then a last line without its newline
            self._read(s)
            self._flush_partial(s)

    def _read(self, s: _Stream) -> None:
        while True:
            try:
                data = os.read(s.read_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            self._tee(s, data)
            buf = s.partial + data
            lines = buf.split(b"\n")
            s.partial = lines.pop()
            for line in lines:
                self._log(s, line)
            while len(s.partial) >= MAX_LINE:
                self._log(s, s.partial[:MAX_LINE])
                s.partial = s.partial[MAX_LINE:]

    @staticmethod
    def _tee(s: _Stream, data: bytes) -> None:
        if s.saved < 0:
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(s.saved, view):]
            except InterruptedError:
                continue
            except OSError:
                return  # the original output is gone (closed, full and non-blocking): log only

    def _flush_partial(self, s: _Stream) -> None:
        if s.partial:
            line, s.partial = s.partial, b""
            self._log(s, line)

    @staticmethod
    def _log(s: _Stream, line: bytes) -> None:
        for start in range(0, max(len(line), 1), MAX_LINE):
            text = line[start:start + MAX_LINE].rstrip(b"\r").decode("utf-8", "backslashreplace")
            try:
                if s.logger.isEnabledFor(s.level):
                    s.logger.handle(logging.LogRecord(s.name, s.level, f"<{s.name}>", 0, text, None, None,
                                                      func="<capture>"))
            except Exception:
                pass

    # -- the process's side -------------------------------------------------------------
    def stop(self, timeout: float = 2.0) -> None:
        """A normal exit: flush, give fd 1 and 2 back, log what is left, a partial line too."""
        if os.getpid() != self.pid:
            return
        _flush_python_streams()
        self._restore()
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self.thread.join(timeout)
        self._close_own()
        for path in self.paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _restore(self) -> None:
        for s in self.streams:
            try:
                if s.saved >= 0:
                    os.dup2(s.saved, s.fd)
                else:
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, s.fd)
                    os.close(null)
            except OSError:
                pass

    def _close_own(self) -> None:
        fds: List[Optional[int]] = [getattr(self, "_wake_r", None), getattr(self, "_wake_w", None)]
        for s in self.streams:
            fds += [s.read_fd, s.saved]
        for fd in fds:
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for s in self.streams:
            s.read_fd = s.saved = -1

    def forget_in_child(self) -> None:
        """A forked child: fd 1 and 2 go back to what the parent had before capturing (the
        FIFOs are the parent's, and its thread is not here); the child captures its own."""
        self._restore()
        self._close_own()
