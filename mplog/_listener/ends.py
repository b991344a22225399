"""The ends of the service's processes in the logs (``Ends``): which processes appeared (their
pidfds join the loop's polls), how each one ended, and the record that says so, written only
after everything its ring still held.

``ExitWatch`` (``exits``) reads the facts of an end (exit status, signal, OOM, fault file,
captured output); ``Ends`` decides when they go into the files. A dead process is *parked*
until its ring is written, in turn with every other ring, so the backlog of a process killed
while it logged much delays no one, and its end still comes after its last record.
"""

from __future__ import annotations

import select
import signal
import time
from typing import Callable, Dict, List, Optional, Tuple

from .._common.record import make_record
from .._common.spool import W_HEAD, RingReader, SpoolReader
from .batch import Batch
from .exits import Exit, ExitWatch, Watched, describe, payload_summary

__all__ = ["Ends"]

_STOPS = (signal.SIGTERM, signal.SIGINT)  # how a pool stops its other workers


class Ends:
    """The processes of the service, from their appearance to the record of their end."""

    def __init__(self, level: int, watch: ExitWatch, reader: SpoolReader, batch: Batch,
                 pollers: List["select.poll"], write: Callable[[], None]) -> None:
        self.level = level  # an end below the service's level is marked, not written
        self.watch = watch
        self.reader = reader
        self.batch = batch
        self.pollers = pollers  # the loop's: each also waits on the watch's pidfds
        self.write = write  # writes what the batch holds (the intake's write of mplog's own records)
        # Ended processes whose ring is still being written: slot -> (who, how, its ring).
        self.parked: Dict[int, Tuple[Watched, Exit, Optional[RingReader]]] = {}

    def refresh(self) -> None:
        """Find the rings, and the processes, that appeared since the last look."""
        self.reader.refresh()
        fds, gone = self.watch.refresh()
        for fd in fds:
            for poller in self.pollers:
                poller.register(fd, select.POLLIN)
        for w in gone:
            self.on_exit(w)

    def on_exits(self, events: List[Tuple[int, int]]) -> None:
        """The pidfds among ``events`` (a poll's) are processes that ended: take their ends."""
        by_fd = self.watch.by_fd
        ended = [by_fd[fd] for fd, _ev in events if fd in by_fd]
        if not ended:
            return
        # Every status first: a zombie's parent may reap it at any moment. Then the ends in
        # the order they explain each other: a pool stops its other workers (SIGTERM) after
        # one of them died.
        statuses = [(w, self.watch.status(w)) for w in ended]
        stopped = [w for w, st in statuses if st is not None and st & 0x7F in _STOPS]
        if stopped:
            # The pool saw its worker die when the worker's pipes closed, early in its exit; a
            # big process becomes a zombie (readable pidfd) only after its memory is freed,
            # maybe after the siblings the pool then stopped: wait for those still dying.
            for w in self.watch.wait_dying({w.ppid for w in stopped}, set(ended), time.monotonic() + 2.0):
                statuses.append((w, self.watch.status(w)))
        statuses.sort(key=lambda ws: ws[1] is not None and ws[1] & 0x7F in _STOPS)
        for w, status in statuses:
            self.on_exit(w, status)

    def on_exit(self, w: Watched, status: Optional[int] = None) -> None:
        """A process of the service ended: read how at once, then park it until the loop has
        written what its ring still holds (in turn with every other ring: its backlog delays
        no one), and only then write its captured output and one record saying how it ended,
        attributed to it, and mark its slot (``end_parked``)."""
        if w.slot in self.parked:
            return  # seen already (finish() polls every pidfd again): its end is on its way
        if status is None:
            status = self.watch.status(w)
        for fd in ([w.fd] if w.fd >= 0 else []):
            for poller in self.pollers:
                try:
                    poller.unregister(fd)
                except (KeyError, ValueError):
                    pass
        self.reader.gone.add(w.slot)  # a torn last entry is skipped, not waited for
        self.reader.refresh()  # a ring it opened just before it died: its records come first
        ring = self.reader.rings.get(w.slot)
        # The details now: its fault file, its cgroup's OOM count and its siblings' ends are
        # evidence of this moment, not of when its ring is drained.
        e = self.watch.collect(w, status, ring.last if ring is not None else None)
        self.parked[w.slot] = (w, e, ring)
        self.end_parked()

    def end_parked(self, force: bool = False) -> None:
        """Write the end of each parked process whose ring is written (all of them if
        ``force``: the listener is stopping), in the order they ended: a pool's stop of its
        other workers comes after the death that caused it."""
        for slot, (w, e, ring) in list(self.parked.items()):
            if not force and ring is not None and ring.pos < ring.words[W_HEAD]:
                break  # its records first; the ends after it wait with it
            del self.parked[slot]
            last = payload_summary(ring.last) if ring is not None and ring.last is not None else None
            if last is not None:
                e.last = last  # its last record, now that it is written
            for rec in self.watch.leftovers(w):
                self.batch.add_record(rec)
            level, message, context, body = describe(e)
            if level is not None and level >= self.level:
                self.batch.add_record(make_record(
                    e.ended, level, "mplog", message, pathname="<exit>", funcName="exit", processName=e.name,
                    process=e.pid, threadName="-", exc_text=body, extras=context))
            self.write()
            self.watch.mark(w, e)  # after the record is in the files: health never runs ahead of the logs
