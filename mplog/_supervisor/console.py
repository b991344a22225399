"""The main process's console: echoed log lines and progress bars share stderr cleanly.

The listener does not write to the terminal itself: it sends console lines to the main
process, where this module prints them. If a tqdm bar is active, lines go through
``tqdm.write`` (which clears and redraws the bars); if one of our own ``progress`` bars is
active, the same is done here. Either way a log line appears above the bar, never inside it.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from typing import Any, Iterable, Iterator, List, Optional, TypeVar

__all__ = ["emit", "progress", "Progress"]

T = TypeVar("T")
_lock = threading.RLock()
_bars: List["Progress"] = []


def _tqdm_active() -> Any:
    tqdm_mod = sys.modules.get("tqdm") or sys.modules.get("tqdm.auto")
    if tqdm_mod is None:
        return None
    cls = getattr(tqdm_mod, "tqdm", None)
    instances = getattr(cls, "_instances", None)
    return cls if instances else None


def emit(text: str) -> None:
    """Print log lines (already cleaned of control characters) on stderr, above any bar."""
    if not text:
        return
    stream = sys.stderr
    if stream is None:
        return
    tqdm_cls = _tqdm_active()
    with _lock:
        try:
            if tqdm_cls is not None:
                for line in text.rstrip("\n").split("\n"):
                    tqdm_cls.write(line, file=stream)
                return
            bar = _bars[-1] if _bars else None
            if bar is not None and bar.interactive:
                stream.write("\r\x1b[K" + text)
                bar._draw(force=True)
            else:
                stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not break the supervisor thread


class Progress:
    """A minimal progress bar on stderr that log lines print above. Use ``progress()``."""

    def __init__(self, total: Optional[int], desc: str = "", stream: Any = None) -> None:
        self.total = total
        self.desc = desc
        self.n = 0
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._start = time.monotonic()

    def __enter__(self) -> "Progress":
        with _lock:
            _bars.append(self)
            self._draw(force=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _lock:
            self._draw(force=True)
            if self.interactive:
                self.stream.write("\n")
            else:
                self.stream.write(self._line() + "\n")
            self.stream.flush()
            if self in _bars:
                _bars.remove(self)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            width = max(10, min(40, shutil.get_terminal_size((80, 20)).columns - len(self.desc) - 40))
            done = int(width * min(self.n, self.total) / self.total)
            return (f"{self.desc} [{'#' * done}{'-' * (width - done)}] {self.n}/{self.total} "
                    f"{100 * self.n / self.total:5.1f}% {rate:7.1f}/s")
        return f"{self.desc} {self.n} {rate:7.1f}/s"

    def _draw(self, force: bool = False) -> None:
        if not self.interactive:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        with _lock:
            try:
                self.stream.write("\r\x1b[K" + self._line())
                self.stream.flush()
            except (OSError, ValueError):
                pass


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: str = "") -> Iterator[T]:
    """Iterate with a progress bar on stderr (drawn only on a terminal; one summary line
    otherwise). mplog's console lines print above it."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc) as bar:
        for item in iterable:
            yield item
            bar.update()


# Fork safety. The supervisor thread prints echoed lines with sys.stderr.write: a child forked
# while it is inside that call inherits the stream's buffer lock held by a thread it does not
# have, and hangs in its first write to stderr or in the flush at its exit (seen: a pool worker
# of the demo, stuck in multiprocessing's _flush_std_streams). So the forking thread holds our
# lock across fork(), and no write of ours is in progress then. A stderr that does not drain
# (a full pipe, a paused terminal) could hold our lock for ever: fork() waits for it at most
# _FORK_WAIT, and such a child gets streams of its own on the same file descriptors.
_FORK_WAIT = 0.5
_fork_held = False


def _before_fork() -> None:
    global _fork_held
    _fork_held = _lock.acquire(timeout=_FORK_WAIT)


def _after_fork_in_parent() -> None:
    global _fork_held
    if _fork_held:
        _fork_held = False
        _lock.release()


def _after_fork_in_child() -> None:
    global _lock, _fork_held
    held, _fork_held = _fork_held, False
    _lock = threading.RLock()  # the child's only thread is the one that forked
    if held:
        return
    streams = {id(sys.stderr)} | {id(bar.stream) for bar in _bars}
    for name in ("stderr", "stdout"):
        old = getattr(sys, name)
        if old is None or id(old) not in streams:
            continue
        try:
            new: Any = open(old.fileno(), "w", buffering=1, encoding=old.encoding, errors=old.errors,
                            closefd=False)
        except (AttributeError, OSError, ValueError, TypeError):
            new = None  # a stream nobody can use is better than one that hangs
        setattr(sys, name, new)
    _bars.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
