"""The listener's record path (``Intake``): take a batch from the rings, format it (``Batch``),
announce it in the journal, write it to both files, commit it (the rings' tails move).

Data flow of one batch::

    SpoolReader.take ──▶ Batch.add_payloads ──▶ Journal.announce ──▶ FileSet.write
        (one os.write per file) ──▶ Journal.commit ──▶ console echo ──▶ parked ends (``Ends``)

A file that cannot be written (disk full, EIO, EFBIG) sends the batch to stderr, counted as
diverted, and the next batch tries the file again. mplog's own records (notices, the ends of
processes) take the same write, uncounted. ``recover`` writes what an earlier run of the same
file set left in its spool.
"""

from __future__ import annotations

import logging
import os
import time
from typing import List, Optional, Tuple

from .._common.config import ListenerConfig
from .._common.counters import Counters
from .._common.record import make_record
from .._common.spool import RingReader, SpoolReader, Taken, remove_spool
from .batch import Batch
from .ends import Ends
from .files import FileSet
from .journal import Journal
from .vitals import Vitals

__all__ = ["Intake"]

# The listener's own records name the loop as their source, as they did before the loop had rooms.
_SOURCE = os.path.join(os.path.dirname(__file__), "loop.py")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Intake:
    """From the rings to the files, one batch at a time, exactly once across kills."""

    def __init__(self, cfg: ListenerConfig, counters: Counters, reader: SpoolReader, batch: Batch, files: FileSet,
                 journal: Journal, ends: Ends) -> None:
        self.cfg = cfg
        self.counters = counters
        self.flush_count = cfg.flush_count
        self.console_fd = cfg.console_fd
        self.reader = reader
        self.batch = batch
        self.files = files
        self.journal = journal
        self.ends = ends  # a parked end is written once its ring is (after each batch)
        self.vitals: Optional[Vitals] = None  # once the loop runs: a long drain samples them
        self.error: Optional[str] = None
        # Cumulative over listener restarts: this listener's FileSet counts from 0.
        self._rotations_base = counters.get("rotations")
        self._reopens_base = counters.get("reopens")

    # -- errors and notices --------------------------------------------------------------
    def report_error(self, text: str) -> None:
        """An error of the files: on stderr once (until it changes), and in the counters."""
        c = self.counters
        if text != self.error:
            try:
                _write_all(2, f"mplog: {text}\n".encode("utf-8", "backslashreplace"))
            except OSError:
                pass
        self.error = text
        c.set_text(text)
        c.set("error_ns", time.time_ns())

    def notice(self, msg: str, levelno: int = logging.WARNING) -> None:
        """Write one of mplog's own records, straight into the files (not counted as sent)."""
        rec = make_record(time.time(), levelno, "mplog", msg, pathname=_SOURCE, funcName="listener",
                          processName="mplog-listener", process=os.getpid(), threadName="MainThread", user=True)
        self.batch.add_record(rec)
        self.write_own()

    def write_own(self) -> None:
        """Write what the batch holds now: mplog's own records (uncounted)."""
        self.write([], 0)

    # -- the files -----------------------------------------------------------------------
    def start(self) -> int:
        """Open the files, settle a dead predecessor's batch, recover earlier runs."""
        for error in self.files.open():
            self.report_error(error)
        self._settle(self.reader, self.journal)
        recovered = 0
        for path in self.cfg.recover:
            recovered += self.recover(path)
        return recovered

    def _settle(self, reader: SpoolReader, journal: Journal) -> None:
        """Finish a dead listener's announced batch (written or not) and read every ring on from
        its committed tail."""
        reader.refresh()
        journal.settle(self.files, reader.rings.values())
        for ring in reader.rings.values():
            ring.rewind()

    def follow_files(self, reopen: bool) -> None:
        """The files' share of housekeeping: follow logrotate (or reopen), rotate by age."""
        c = self.counters
        for error in self.files.housekeeping(reopen):
            self.report_error(error)
        c.set("rotations", self._rotations_base + self.files.rotations)
        c.set("reopens", self._reopens_base + self.files.reopens)

    # -- records -------------------------------------------------------------------------
    def pump(self, only: Optional[RingReader] = None) -> int:
        """Take one batch from the spool (or from the ring ``only``), write it, commit it.
        Returns the records taken."""
        taken = self.reader.take(self.flush_count, only)
        if not taken:
            return 0
        n = 0
        add = self.batch.add_payloads
        for ring, t in taken:
            payloads = t.payloads
            add(payloads, f"pid {ring.pid}")
            if payloads:
                ring.last = payloads[-1]  # for the record of its end, should it die
            n += len(payloads)
        self._sync_corrupt()
        self.write(taken, n)
        if self.ends.parked:
            self.ends.end_parked()
        return n

    def _sync_corrupt(self) -> None:
        c = self.counters
        if self.reader.corrupt:
            c.add("torn", self.reader.corrupt)
            self.reader.corrupt = 0

    def write(self, taken: List[Tuple[RingReader, Taken]], n: int, journal: Optional[Journal] = None) -> None:
        """Write the batch's texts to both files, announced first in the journal so a listener
        killed half-way is settled exactly by the next one (``n`` 0: a notice, uncounted)."""
        journal = journal or self.journal
        c = self.counters
        full, simp, cons = self.batch.take_texts()
        if not full and not taken:
            return
        if n or taken:
            journal.announce(self.files, len(full), len(simp), n, ((r, t) for r, t in taken))
        written = True
        try:
            for error in self.files.write(simp, full):
                self.report_error(error)
            c.set("rotations", self._rotations_base + self.files.rotations)
        except OSError as exc:
            written = False
            self._write_failed(exc, full, n)
        else:
            if self.error is not None:
                self.error = None
                c.set_text("")
                c.set("error_ns", 0)
        journal.commit(n, taken, written)
        c.set("last_write_ns", time.time_ns())
        if cons:
            try:  # non-blocking pipe to the main process: if it is not reading, the echo is skipped
                _write_all(self.console_fd, cons.encode("utf-8", "backslashreplace"))
            except OSError:
                pass

    def _write_failed(self, exc: OSError, full: bytes, n: int) -> None:
        # Disk full, EIO, EFBIG, a file we cannot reopen: the records go to stderr, counted as
        # diverted, and the next batch tries the file again (it resumes when space returns).
        c = self.counters
        c.add("write_errors")
        path = getattr(exc, "filename", None) or self.cfg.full_path
        self.report_error(f"cannot write {path}: {exc.strerror or exc}")
        if n:
            c.add("stderr_records", n)
            try:
                _write_all(2, full)
            except OSError:
                pass

    def drain(self, deadline: float) -> bool:
        """Write everything the spool holds now (by ``deadline``). True if it is all written."""
        self.ends.refresh()
        while True:
            now = time.monotonic()
            if now >= deadline:
                return not self.reader.has_backlog()
            if self.vitals is not None:  # a long drain (a flush of a deep spool) is no silence
                self.vitals.sample(now)
            if not self.pump():
                return not self.reader.has_backlog()

    def recover(self, path: str) -> int:
        """Write what a previous run of this file set left in its spool, then remove it."""
        from .._common.spool import read_owner
        try:
            old = Counters.open(os.path.join(path, "counters"))
        except OSError:
            remove_spool(path)
            return 0
        pid = read_owner(path)[0]
        reader = SpoolReader(path, old)
        journal = Journal(old)
        self._settle(reader, journal)
        n = 0
        while True:
            taken = reader.take(self.flush_count)
            if not taken:
                break
            count = 0
            for ring, t in taken:
                for payload in t.payloads:
                    self.batch.add_payload(payload, f"pid {ring.pid} of a previous run")
                count += len(t.payloads)
            self.write(taken, count, journal)  # counted as written in the old run's counters
            n += count
        reader.close()
        old.close()
        remove_spool(path)
        self.counters.add("recovered", n)
        if n:
            self.notice(f"recovered {n} records from a previous run (pid {pid})")
        return n
