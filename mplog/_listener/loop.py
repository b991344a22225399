"""The listener process: the only code that opens, writes or closes the log files.

Data flow::

    workers ──publish──▶ ring.<slot> (spool, one per process) ──SpoolReader.take──▶ decode
        ──▶ format (or append text formatted by the worker) ──▶ Journal.announce
        ──▶ FileSet.write (one os.write per file per batch) ──▶ Journal.commit (ring tails move)
    main process ──control frames──▶ FIFO ──▶ flush barrier, stop, reopen, notices, doorbell

It runs as ``python -m mplog._listener CONFIG`` (a fresh interpreter, whatever start method the
application's pools use: the user's ``__main__`` is never re-imported here, and no thread of the
application is inherited). It ignores SIGINT, so Ctrl-C in the application cannot lose the tail.
It drains and exits by itself when its parent dies, even by SIGKILL; on SIGTERM to the whole
process group (``timeout``, SLURM, systemd) it writes everything the spool holds and is the last
process of the service to go.

Exactness across kills: a ring's tail moves only after its records are in the files, and each
batch is announced first (``_journal``), so a listener that starts after a killed one carries on
exactly where the dead one stopped.

The rooms: ``Listener`` is the loop and the control protocol; ``SpoolReader`` the intake;
``Journal`` the batch journal; ``FileSet`` the two files; ``Batch`` the formatting of records
into the texts of one batch; ``ExitWatch`` (``_exits``) the watch over how each process of the
service ends, whose pidfds wake this loop like the FIFO does.
"""

from __future__ import annotations

import logging
import marshal
import os
import select
import shutil
import signal
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from .._common import compiled as _compiled
from .._common.config import ListenerConfig
from .._common.counters import STATE_STOPPED, Counters, settle_accounts
from .exits import Exit, ExitWatch, Watched, describe, payload_summary
from .files import FileSet
from .._common.format import (NOT_TALLIED, SEPARATOR, FullFormatter, JsonFormatter, SimplifiedFormatter, StdlibFormatter, Timestamps, colour,
                      format_both)
from .journal import Journal
from .._common.record import TAG_COMMON, TEXT_VERSION, Formatted, Record, decode, decode_formatted, make_record
from .._common.spool import W_HEAD, RingReader, SpoolReader, Taken, remove_spool
from .._common.transport import K_FLUSH, K_NOTICE, K_REOPEN, K_STOP, FrameParser

__all__ = ["Listener", "main"]

_MAX_DISTINCT_WARNINGS = 1000
_WARNING, _ERROR = logging.WARNING, logging.ERROR
_loads = marshal.loads
_MILLIS = [f"{ms:03d}" for ms in range(1000)]
_MESSAGE = "\n  Message: "
_TAIL = "\n" + SEPARATOR + "\n"
_PIECES = (_MESSAGE, _TAIL, "\n", ": ")  # the constant texts the compiled loop appends
_MAX_HEADS = 4096  # headers kept: call sites times processes; past this the cache starts again
_BLOCK_END = (SEPARATOR + "\n").encode()
_IDLE_POLL_MS = 100  # a missed doorbell (see Listener.sleep) costs at most this much latency


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _make_formatters(cfg: ListenerConfig, stamps: Timestamps) -> Tuple[Any, Any]:
    simple: Any = SimplifiedFormatter(stamps)
    full: Any = FullFormatter(stamps)
    if cfg.simplified_format:
        simple = StdlibFormatter(cfg.simplified_format, cfg.datefmt)
    if cfg.full_format == "jsonl":
        full = JsonFormatter()
    elif cfg.full_format:
        full = StdlibFormatter(cfg.full_format, cfg.datefmt)
    return simple, full


class Batch:
    """The texts of one batch: records in, two files' bytes and the console's lines out. Every
    record is decoded and formatted here (the process that logged it only marshalled its
    fields); ``add_payloads`` is the hot loop for common records in the default formats, and
    hands everything else to ``add_payload``, the one general path."""

    def __init__(self, cfg: ListenerConfig, counters: Counters, forwarder: Any) -> None:
        self.counters = counters
        self.stamps = Timestamps()
        self.simple, self.full = _make_formatters(cfg, self.stamps)
        # Both default formats: format them together (shared timestamp and message checks).
        self.fused = type(self.simple) is SimplifiedFormatter and type(self.full) is FullFormatter
        self.simplified_level = cfg.simplified_level
        self.console = cfg.console
        self.console_colour = cfg.console_colour
        self.forwarder = forwarder
        self.warnings: Dict[str, int] = {}
        # Texts, encoded once per batch: one join and one encode beat one encode per record.
        self._full: List[str] = []
        self._simp: List[str] = []
        self._cons: List[str] = []
        self._heads: Dict[Tuple[Any, ...], str] = {}  # see add_payloads
        # _format_common's compiled twin where it was built, and not under MPLOG_PURE_PYTHON=1.
        self._compiled = _compiled.speedups.format_common if _compiled.enabled() else None

    def add_payloads(self, payloads: List[bytes], origin: str) -> None:
        """Add one ring's records. The common record in the default formats is formatted in
        one loop (compiled where it was built, ``_speedups.format_common``; else
        ``_format_common``), with the same result as ``add_payload``; anything else goes there."""
        if not self.fused or self.forwarder is not None or self.console is not None:
            for payload in payloads:
                self.add_payload(payload, origin)
        elif self._compiled is not None:
            self._compiled(payloads, self._full, self._simp, self.simplified_level, self.stamps, self._heads,
                           self._head_rest, self._tally, self.add_payload, origin, _MILLIS, NOT_TALLIED, _PIECES,
                           TAG_COMMON)
        else:
            self._format_common(payloads, origin)

    def _format_common(self, payloads: List[bytes], origin: str) -> None:
        """The reference of the hot loop: what it formats, and what it leaves to the general
        path (any record it does not fully know, as the compiled twin does)."""
        loads = _loads
        full_out = self._full.append
        simp_out = self._simp.append
        simplified_level = self.simplified_level
        stamps = self.stamps
        heads = self._heads
        for payload in payloads:
            try:
                obj = loads(payload)
                if type(obj) is not tuple or len(obj) != 2:
                    raise ValueError
                tag, fields = obj
                if type(tag) is not int or tag != TAG_COMMON or type(fields) is not tuple:
                    raise ValueError
                (created, levelno, levelname, name, msg, args, pathname, lineno, pname, process, _exc_info,
                 exc_text, stack) = fields  # _record.LEAN_KEYS: the default formats
                # Exact types: the header cache below is keyed by equality, and True == 1 == 1.0
                # would share one text ("[stage.py:1]") where the general path writes each.
                if (exc_text is not None or stack is not None or type(msg) is not str or type(created) is not float
                        or type(levelno) is not int or type(levelname) is not str or type(name) is not str
                        or type(lineno) is not int or type(process) is not int or type(pname) is not str
                        or type(pathname) is not str):
                    raise ValueError
                if args:
                    msg = msg % args
                if not msg.isprintable():
                    raise ValueError
                sec = int(created)
                if sec != stamps._sec:
                    stamps.second(created)
                ts = stamps._text
                millis = _MILLIS[int((created % 1) * 1000)]
                # The header but its time, made once per call site and process (and checked
                # once: a header field that would need escaping takes the general path).
                key = (levelname, name, pname, process, pathname, lineno)
                rest = heads.get(key)
                if rest is None:
                    rest = self._head_rest(key)
            except Exception:  # noqa: BLE001 - not the common case, or not well formed: the general path
                self.add_payload(payload, origin)
                continue
            if _WARNING <= levelno < _ERROR and name not in NOT_TALLIED:
                self._tally(msg[:200])
            full_out(f"[{ts}.{millis}] {rest}{_MESSAGE}{msg}{_TAIL}")
            if levelno >= simplified_level:
                simp_out(f"[{ts}] {msg}\n" if levelno < _WARNING else f"[{ts}] {levelname}: {msg}\n")

    def _head_rest(self, key: Tuple[Any, ...]) -> str:
        levelname, name, pname, process, pathname, lineno = key
        filename = pathname[pathname.rfind("/") + 1:] if pathname else "?"
        rest = f"[{levelname}] [{name}] [{pname}:{process}] [{filename}:{lineno}]"
        if not rest.isprintable():
            raise ValueError("a header field needs escaping")
        if len(self._heads) >= _MAX_HEADS:
            self._heads.clear()
        self._heads[key] = rest
        return rest

    def add_payload(self, payload: bytes, origin: str) -> None:
        """The general path: any record, decoded and formatted, or a counted placeholder."""
        if payload[:1] == b"\x02":  # formatted by a process of an earlier mplog (a recovered spool)
            try:
                self.add_text(decode_formatted(payload))
                return
            except ValueError:
                pass  # falls through to the placeholder below
        failures = 0
        try:
            rec, failures = decode(payload)
        except ValueError as exc:
            failures = 1
            rec = make_record(time.time(), logging.WARNING, "mplog", f"<undecodable record from {origin}: {exc}>")
        except Exception as exc:  # noqa: BLE001 - a bug of ours: one record, never the listener
            # The batch is committed only once written, so a record that made the listener fail
            # would fail every listener the supervisor starts after it (a bytes exc_text did).
            failures = 1
            rec = make_record(time.time(), logging.ERROR, "mplog",
                              f"<record from {origin} could not be decoded: {type(exc).__name__}>")
        if failures:
            self.counters.add("replaced_listener", failures)
        if rec[0] == TEXT_VERSION:
            self.add_text(rec)
        else:
            self.add_record(rec)

    def add_text(self, t: Formatted) -> None:
        """A record formatted by the process that logged it: append its texts."""
        full, simple = t.full, t.simple
        if not (full[:1] == b"[" and full.endswith(_BLOCK_END) and (simple is None or simple.endswith(b"\n"))):
            self.counters.add("replaced_listener")  # not what our writers send: a placeholder
            self.add_record(make_record(time.time(), logging.WARNING, "mplog", "<malformed pre-formatted record>"))
            return
        self._append(full.decode("utf-8", "replace"), None if simple is None else simple.decode("utf-8", "replace"),
                     t.levelno)
        if t.warning:
            self._tally(t.warning)

    def add_record(self, rec: Record) -> None:
        try:
            levelno = rec.levelno
            wanted = levelno >= self.simplified_level or rec.user
            if self.fused:
                full, line = format_both(rec, self.stamps, self.full, self.simple, wanted)
            else:
                full = self.full.format(rec)
                line = self.simple.format(rec) if wanted else None
            self._append(full, line, levelno)
            if self.forwarder is not None:
                self.forwarder.submit(rec)
            if logging.WARNING <= levelno < logging.ERROR and rec.name not in NOT_TALLIED:
                self._tally(rec.msg.split("\n", 1)[0][:200])
        except Exception as exc:  # a bad field or a formatter bug costs one record, not the listener
            self.counters.add("replaced_listener")
            self._full.append(self.full.format(make_record(
                time.time(), logging.ERROR, "mplog", f"<record could not be formatted: {exc!r}>")))

    def _append(self, full: str, simple: Optional[str], levelno: int) -> None:
        self._full.append(full)
        if simple is not None:
            self._simp.append(simple)
            if self.console is not None and levelno >= self.console:
                self._cons.append(colour(simple, levelno) if self.console_colour else simple)

    def _tally(self, key: str) -> None:
        if key in self.warnings or len(self.warnings) < _MAX_DISTINCT_WARNINGS:
            self.warnings[key] = self.warnings.get(key, 0) + 1

    def take_texts(self) -> Tuple[bytes, bytes, str]:
        full = "".join(self._full).encode("utf-8", "backslashreplace")
        simp = "".join(self._simp).encode("utf-8", "backslashreplace")
        cons = "".join(self._cons)
        self._full.clear()
        self._simp.clear()
        self._cons.clear()
        return full, simp, cons


class Vitals:
    """The listener's own figures for health, sampled with psutil about once a second and
    published in the shared counters, where the supervisor reads them.

    The main process does not import psutil: a forked worker maps whatever its parent had, and
    psutil was 1.0 MB of every one. A listener that stops sampling (stopped, or stuck in a write
    to a stalled file system) is what health calls unresponsive; the CLI, a process of its own,
    asks psutil what the kernel says of it. Nothing here may stop the listener: without psutil's
    figures a sample still says that the loop runs.
    """

    EVERY = 1.0

    def __init__(self, counters: Counters, parent_pid: int) -> None:
        self.counters = counters
        self.last = 0.0
        self.ps: Any = None
        try:
            import psutil  # the listener's only use of it, on its main thread before any other starts
            self.ps = psutil.Process()
            self.ps.cpu_percent(None)  # the first reading is meaningless: take and discard it
            counters.set("vital_create_us", int(self.ps.create_time() * 1e6))
            # The service's identity in its health file (pid + create_time), for the CLI.
            counters.set("main_create_us", int(psutil.Process(parent_pid).create_time() * 1e6))
        except Exception:  # noqa: B902 - no psutil, no /proc, a parent already gone: fewer figures
            pass
        self.sample(time.monotonic())

    def sample(self, now: float) -> None:
        if now - self.last < self.EVERY:
            return
        self.last = now
        c = self.counters
        figures = (-1, -1, -1)
        if self.ps is not None:
            try:
                with self.ps.oneshot():
                    figures = (int(self.ps.cpu_percent(None) * 100), self.ps.memory_info().rss,
                               self.ps.num_fds() if hasattr(self.ps, "num_fds") else -1)
            except Exception:  # out of fds, /proc unreadable: this sample has no figures
                pass
        c.set("vital_cpu_centi", figures[0])
        c.set("vital_rss", figures[1])
        c.set("vital_fds", figures[2])
        c.set("vital_pid", os.getpid())
        c.set("vital_ns", time.time_ns())  # last: it dates the figures above


class Listener:
    def __init__(self, cfg: ListenerConfig) -> None:
        self.cfg = cfg
        self.counters = Counters.open(cfg.counters_path)
        self.flush_count = cfg.flush_count
        self.console_fd = cfg.console_fd
        self.files = FileSet(cfg.simplified_path, cfg.full_path, cfg.file_mode, cfg.rotate_bytes,
                             cfg.rotate_interval, cfg.backup_count, cfg.compress, cfg.follow_symlinks)
        # Housekeeping (logrotate, rotation by age) runs once a second, or as often as a shorter
        # rotate_interval needs.
        self.housekeeping_every = min(1.0, cfg.rotate_interval / 2) if cfg.rotate_interval else 1.0
        self.forwarder: Any = None
        if cfg.syslog:
            from .syslog import SyslogForwarder
            host, port = cfg.syslog
            self.forwarder = SyslogForwarder(host, int(port), level=cfg.syslog_level or logging.DEBUG)
            # Counters are cumulative over listener restarts; a killed listener's buffered
            # syslog messages are gone with it (its files' copy is not).
            self._syslog_base = {k: self.counters.get("syslog_" + k)
                                 for k in ("forwarded", "dropped", "lost", "reconnects", "resets")}
        self.batch = Batch(cfg, self.counters, self.forwarder)
        # Cumulative over listener restarts: this listener's FileSet counts from 0.
        self._rotations_base = self.counters.get("rotations")
        self._reopens_base = self.counters.get("reopens")
        self.intake = SpoolReader(cfg.runtime_dir, self.counters)
        self.watch = ExitWatch(self.counters, cfg.runtime_dir, cfg.parent_pid or os.getppid())
        self.pollers: List["select.poll"] = []  # the loop's: each also waits on the watch's pidfds
        self.journal = Journal(self.counters)
        self.control = FrameParser()
        self.reopen_requested = False
        self.error: Optional[str] = None
        self.reply_fd = cfg.reply_fd
        self.stopping = False
        self.owner_quiet = False  # K_STOP said no thread of the main process is publishing
        self.stop_deadline = 0.0
        self.terminated = 0.0  # when SIGTERM came (0: it did not)
        self.vitals: Optional[Vitals] = None
        # Ended processes whose ring is still being written: slot -> (who, how, its ring).
        self.parked: Dict[int, Tuple[Watched, Exit, Optional[RingReader]]] = {}

    # -- errors and notices --------------------------------------------------------------
    def _error(self, text: str) -> None:
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
        rec = make_record(time.time(), levelno, "mplog", msg, pathname=__file__, funcName="listener",
                          processName="mplog-listener", process=os.getpid(), threadName="MainThread", user=True)
        self.batch.add_record(rec)
        self.write([], 0)

    def refresh(self) -> None:
        """Find the rings, and the processes, that appeared since the last look."""
        self.intake.refresh()
        fds, gone = self.watch.refresh()
        for fd in fds:
            for poller in self.pollers:
                poller.register(fd, select.POLLIN)
        for w in gone:
            self.on_exit(w)

    def housekeeping(self) -> None:
        """Once a second: follow logrotate, rotate by age, retire the rings of dead processes."""
        c = self.counters
        for error in self.files.housekeeping(self.reopen_requested):
            self._error(error)
        self.reopen_requested = False
        c.set("rotations", self._rotations_base + self.files.rotations)
        c.set("reopens", self._reopens_base + self.files.reopens)
        self.refresh()
        for w in self.watch.unpolled_ended():
            self.on_exit(w)
        self.watch.open_fifos()
        for index, ring in self.intake.rings.items():
            if ring.last is not None and ring.last is not ring.stamped:
                ring.stamped = ring.last
                self.watch.stamp(index, ring.last)
        self.intake.retire(keep=self.watch.by_slot)
        self.publish_syslog()
        if self.vitals is not None:
            self.vitals.sample(time.monotonic())

    # -- how processes end -----------------------------------------------------------------
    def on_exits(self, events: List[Tuple[int, int]]) -> None:
        by_fd = self.watch.by_fd
        ended = [by_fd[fd] for fd, _ev in events if fd in by_fd]
        if not ended:
            return
        # Every status first: a zombie's parent may reap it at any moment. Then the ends in
        # the order they explain each other: a pool stops its other workers (SIGTERM) after
        # one of them died.
        statuses = [(w, self.watch.status(w)) for w in ended]
        stopped = [w for w, st in statuses if st is not None and st & 0x7F in (signal.SIGTERM, signal.SIGINT)]
        if stopped:
            # The pool saw its worker die when the worker's pipes closed, early in its exit; a
            # big process becomes a zombie (readable pidfd) only after its memory is freed,
            # maybe after the siblings the pool then stopped: wait for those still dying.
            for w in self.watch.wait_dying({w.ppid for w in stopped}, set(ended), time.monotonic() + 2.0):
                statuses.append((w, self.watch.status(w)))
        statuses.sort(key=lambda ws: ws[1] is not None and ws[1] & 0x7F in (signal.SIGTERM, signal.SIGINT))
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
        self.intake.gone.add(w.slot)  # a torn last entry is skipped, not waited for
        self.intake.refresh()  # a ring it opened just before it died: its records come first
        ring = self.intake.rings.get(w.slot)
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
            if level is not None and level >= self.cfg.level:
                self.batch.add_record(make_record(
                    e.ended, level, "mplog", message, pathname="<exit>", funcName="exit", processName=e.name,
                    process=e.pid, threadName="-", exc_text=body, extras=context))
            self.write([], 0)
            self.watch.mark(w, e)  # after the record is in the files: health never runs ahead of the logs

    def publish_syslog(self) -> None:
        if self.forwarder is None:
            return
        c = self.counters
        st = self.forwarder.state()
        for key, base in self._syslog_base.items():
            c.set("syslog_" + key, base + st[key])
        c.set("syslog_connected", 1 if st["connected"] else 0)
        c.set("syslog_pending", st["pending"] + st["in_flight"])

    # -- records -------------------------------------------------------------------------
    def pump(self, only: Optional[RingReader] = None) -> int:
        """Take one batch from the spool (or from the ring ``only``), write it, commit it.
        Returns the records taken."""
        taken = self.intake.take(self.flush_count, only)
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
        if self.parked:
            self.end_parked()
        return n

    def _sync_corrupt(self) -> None:
        c = self.counters
        if self.intake.corrupt:
            c.add("torn", self.intake.corrupt)
            self.intake.corrupt = 0

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
                self._error(error)
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
        self._error(f"cannot write {path}: {exc.strerror or exc}")
        if n:
            c.add("stderr_records", n)
            try:
                _write_all(2, full)
            except OSError:
                pass

    def drain(self, deadline: float) -> bool:
        """Write everything the spool holds now (by ``deadline``). True if it is all written."""
        self.refresh()
        while True:
            now = time.monotonic()
            if now >= deadline:
                return not self.intake.has_backlog()
            if self.vitals is not None:  # a long drain (a flush of a deep spool) is no silence
                self.vitals.sample(now)
            if not self.pump():
                return not self.intake.has_backlog()

    # -- control -------------------------------------------------------------------------
    def read_control(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                return
            for kind, pid, _tid, _seq, payload in self.control.feed(data):
                if kind == K_STOP:
                    self.counters.set("stop_pid", pid)  # who asked: see _supervisor._on_exit
                self.on_control(kind, payload)

    def on_control(self, kind: int, payload: bytes) -> None:
        c = self.counters
        if kind == K_FLUSH:
            # Everything logged before the flush() call is in a ring now: write it all.
            self.drain(time.monotonic() + 30.0)
            token = struct.unpack("<q", payload[:8])[0] if len(payload) >= 8 else 0
            if token > c.get("flushed_token"):
                c.set("flushed_token", token)
            self._reply()
        elif kind == K_STOP:
            self.stopping = True
            budget = struct.unpack("<d", payload[:8])[0] if len(payload) >= 8 else 1.0
            self.stop_deadline = time.monotonic() + max(0.0, budget)
            # The main process holds its threads off its ring while it stops us (see finish).
            self.owner_quiet = len(payload) > 8 and payload[8] == 1
        elif kind == K_REOPEN:
            self.pump()
            self.reopen_requested = True
            self.housekeeping()
        elif kind == K_NOTICE:
            self.notice(payload.decode("utf-8", "backslashreplace"))
        c.add("malformed", self.control.malformed - self._malformed_seen)
        self._malformed_seen = self.control.malformed

    _malformed_seen = 0

    def _reply(self) -> None:
        if self.reply_fd >= 0:
            try:
                os.write(self.reply_fd, b"!")
            except OSError:
                pass  # the main process is not reading; it polls the counter too

    # -- the loop ------------------------------------------------------------------------
    def start(self) -> int:
        """Open the files, settle a dead predecessor's batch, recover earlier runs."""
        for error in self.files.open():
            self._error(error)
        self.intake.refresh()
        self.journal.settle(self.files, self.intake.rings.values())
        for ring in self.intake.rings.values():
            ring.rewind()
        recovered = 0
        for path in self.cfg.recover:
            recovered += self.recover(path)
        return recovered

    def recover(self, path: str) -> int:
        """Write what a previous run of this file set left in its spool, then remove it."""
        from .._common.spool import read_owner
        try:
            old = Counters.open(os.path.join(path, "counters"))
        except OSError:
            remove_spool(path)
            return 0
        pid = read_owner(path)[0]
        intake = SpoolReader(path, old)
        intake.refresh()
        journal = Journal(old)
        journal.settle(self.files, intake.rings.values())
        for ring in intake.rings.values():
            ring.rewind()
        n = 0
        while True:
            taken = intake.take(self.flush_count)
            if not taken:
                break
            count = 0
            for ring, t in taken:
                for payload in t.payloads:
                    self.batch.add_payload(payload, f"pid {ring.pid} of a previous run")
                count += len(t.payloads)
            self.write(taken, count, journal)  # counted as written in the old run's counters
            n += count
        intake.close()
        old.close()
        remove_spool(path)
        self.counters.add("recovered", n)
        if n:
            self.notice(f"recovered {n} records from a previous run (pid {pid})")
        return n

    def run(self) -> int:
        cfg = self.cfg
        self.start()
        c = self.counters
        c.set("listener_pid", os.getpid())
        fifo = os.open(cfg.fifo_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # The spool kept whatever the dead listener had not written: nothing is lost to a
        # restart (lost_listener stays as it was, 0 unless a ring failed its checks). Each notice
        # is counted once written, so a listener killed before it writes one leaves it to the
        # next (written twice if killed between the two: never missing).
        for reason in cfg.late_restarts:
            self.notice(f"listener restarted after {reason} (a late notice: the listener started after it "
                        "died before writing it); 0 records lost")
            c.add("restarts_noted")
        if cfg.restart_reason:
            self.notice(f"listener restarted after {cfg.restart_reason}; 0 records lost")
            c.add("restarts_noted")
        poller = select.poll()
        poller.register(fifo, select.POLLIN)
        self.pollers.append(poller)
        parent = cfg.parent_pid or os.getppid()
        parent_fd = -1
        try:
            parent_fd = os.pidfd_open(parent)  # type: ignore[attr-defined]
            poller.register(parent_fd, select.POLLIN)
        except (AttributeError, OSError):
            parent_fd = -1
        # Before the reply: the service writes its first health file as soon as we are up.
        self.vitals = Vitals(c, parent)
        self._reply()  # tell the supervisor we are up
        # While records are flowing, pause between batches *without* waiting on anything the
        # writers touch: they only copy into their rings, and nobody pays for a wake-up. The
        # pause is far below flush_interval and short against a ring's capacity.
        pause = select.poll()
        if parent_fd >= 0:
            pause.register(parent_fd, select.POLLIN)
        self.pollers.append(pause)
        for fd in self.watch.by_fd:
            poller.register(fd, select.POLLIN)
            pause.register(fd, select.POLLIN)
        last_housekeeping = time.monotonic()
        parent_gone = False
        while True:
            self.read_control(fifo)
            if self.watch.behind:  # a process just claimed a slot: watch it from now
                self.refresh()
            busy = backlog = False
            for _ in range(64):  # bounded: control messages and housekeeping get their turn
                n = self.pump()
                if not n:
                    break
                busy = True
                # A full batch, or a ring cut by its byte budget: more is waiting. Anything
                # less: the rings are drained for now.
                backlog = n >= self.flush_count or self.intake.cut
                if not backlog:
                    break
            if backlog:  # behind: no pause (writers may be waiting for room), events only
                events = pause.poll(0)
            elif busy:  # records trickle in: let them gather into one batch
                events = pause.poll(5)
            elif self.stopping:  # asked to stop: finish now, not after a sleep (stop() waits)
                events = pause.poll(0)
            else:
                events = self.sleep(poller)
            for fd, _ev in events:
                if fd == parent_fd:
                    parent_gone = True
            if events:
                self.on_exits(events)
            now = time.monotonic()
            if now - last_housekeeping >= self.housekeeping_every or self.reopen_requested:
                last_housekeeping = now
                self.housekeeping()
                if parent_fd < 0 and os.getppid() != parent:
                    parent_gone = True
            if self.stopping:
                self.read_control(fifo)
                self.finish("stopped", self.stop_deadline)
                return 0
            if parent_gone:
                self.read_control(fifo)
                self.outlive_the_group(time.monotonic() + cfg.shutdown_timeout)
                self.notice("the application exited without stopping the log service", logging.WARNING)
                self.finish("stopped (application gone)", time.monotonic() + 1.0)
                self.remove_if_empty()
                if cfg.capture_dir:  # its children's capture: nobody else is left to withdraw it
                    from .._common.room import remove_own_dir
                    remove_own_dir(cfg.capture_dir)  # only if it is ours
                return 0
            if self.terminated and now - self.terminated >= 1.0:
                # SIGTERM to this process alone (the application lives on and did not stop us):
                # everything taken is written; die of it, so the supervisor names the exit and
                # starts a successor at once. The spool keeps what came after.
                self.pump()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

    def sleep(self, poller: "select.poll") -> List[Tuple[int, int]]:
        """Every ring is empty: sleep until a doorbell, a control message or a timeout."""
        c = self.counters
        c.set("sleeping", 1)
        # A writer that published before seeing the flag set gets no bell: look once more.
        # (Between the two processes' store and load there is no fence; the poll timeout
        # bounds the latency of the rare record that slips through.)
        self.refresh()
        if self.intake.has_backlog():
            c.set("sleeping", 0)
            return []
        events = poller.poll(_IDLE_POLL_MS if not self.terminated else 20)
        c.set("sleeping", 0)
        return events

    def outlive_the_group(self, deadline: float) -> None:
        """The application is gone (killed, or the whole group was signalled): write what the
        spool holds while any of its processes still runs, and go last."""
        while time.monotonic() < deadline:
            self.drain(deadline)
            self.on_exits([(w.fd, 0) for w in self.watch.ready()])
            if not self.intake.producers_alive():
                self.drain(deadline)  # what they published as they died
                return
            time.sleep(0.01)  # a deadline loop on a condition: the producers' exits

    def remove_if_empty(self) -> None:
        # Nobody else will: the main process is gone. Keep a spool that still holds records.
        if not self.intake.unwritten():
            self.intake.close()
            remove_spool(self.cfg.runtime_dir)

    def final_counts(self) -> Tuple[int, int, int]:
        """(sent, dropped, diverted), with ``sent`` built from counts that each have one writer.

        Writers may still be diverting while this runs, and a process adds to its ``sent``
        before its ``diverted``: summing whole columns one after the other could see one and not
        the other. So each slot's sent is what it published (the last sequence number of its
        ring, from the producer's header or from what this listener committed) plus its dropped
        and diverted, read once. This also settles a writer killed between publishing and
        counting (in doubt).
        """
        from .._common.counters import S_DIVERTED, S_DROPPED, S_SEEN
        from .._common.spool import W_PUBLISHED
        c = self.counters
        rings = self.intake.rings
        sent = dropped = diverted = 0
        for index in range(c.slots_used):
            slot = c.slot(index)
            d, v = slot.get(S_DROPPED), slot.get(S_DIVERTED)
            published = slot.get(S_SEEN)
            ring = rings.get(index)
            if ring is not None:
                published = max(published, ring.words[W_PUBLISHED], ring.done)
            sent += published + d + v
            dropped += d
            diverted += v
        return sent, dropped, diverted

    def finish(self, how: str, deadline: float) -> None:
        c = self.counters
        self.drain(deadline)
        self.on_exits([(w.fd, 0) for w in self.watch.ready()])  # ends seen before the stop
        # From now on writers divert to stderr. A writer that read the state just before this
        # may still publish: give it a moment, and take what it published. The main process
        # holds its own threads off its ring while it stops us (LogService.stop), so only
        # another live process of the service can be in that window: an idle service, or one
        # whose workers have ended, stops without the wait.
        c.set("state", STATE_STOPPED)
        self.refresh()
        if self.watch.by_slot or not self.owner_quiet:
            grace = time.monotonic() + 0.05
            while time.monotonic() < grace:
                time.sleep(0.005)  # a short bounded wait for in-flight writers, then a last look
        self.drain(max(deadline, time.monotonic() + 0.5))
        self.end_parked(force=True)  # a ring not written by the deadline stays in the spool
        sent, dropped, diverted = self.final_counts()
        written = c.get("written")
        diverted += c.get("stderr_records")
        settled = settle_accounts(sent, written, dropped, diverted, c.get("torn") + c.get("lost_listener"), 0)
        lost = settled["lost"]
        for key, value in (("final_written", written), ("final_sent", settled["sent"]),
                           ("final_dropped", dropped), ("final_diverted", diverted), ("final_lost", lost)):
            c.set(key, value)
        c.set("final_set", 1)
        summary = f"mplog {how}: {written} records written, {dropped} dropped, {lost} lost"
        if diverted:
            summary += f", {diverted} sent to stderr"
        recovered = c.get("recovered")
        if recovered:
            summary += f"; {recovered} recovered from a previous run"
        warned = sorted(self.batch.warnings.items(), key=lambda kv: (-kv[1], kv[0]))
        if warned:
            summary += f"; {len(warned)} distinct warning(s):"
            for text, count in warned[:50]:
                summary += f"\n{count:>6} x {text}"
            if len(warned) > 50:
                summary += f"\n   ... and {len(warned) - 50} more"
        self.notice(summary, logging.INFO)
        if self.forwarder is not None:
            self.forwarder.close(min(2.0, max(0.2, deadline - time.monotonic())))
            self.publish_syslog()
        self.files.close()


def main(argv: Optional[List[str]] = None) -> int:
    # Before anything else: Ctrl-C goes to the whole process group, and must not lose the tail.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A file size limit (RLIMIT_FSIZE) must give EFBIG, which we handle, not kill us.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        # One open ring (an mmap keeps a dup of its fd) per live process of the application:
        # thousands of workers must not run the listener out of descriptors.
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    argv = sys.argv[1:] if argv is None else argv
    listener = Listener(ListenerConfig.from_json(argv[0]))

    def _term(_signum: int, _frame: Any) -> None:
        # timeout(1), SLURM and systemd signal the whole group: drain, outlive it, then go.
        if not listener.terminated:
            listener.terminated = time.monotonic()

    signal.signal(signal.SIGTERM, _term)
    if hasattr(signal, "SIGHUP"):
        # logrotate's postrotate convention: SIGHUP means reopen the files.
        def _hup(_signum: int, _frame: Any) -> None:
            listener.reopen_requested = True
        signal.signal(signal.SIGHUP, _hup)
    return listener.run()


if __name__ == "__main__":
    status = main()
    # Everything is written (os.write) and closed: the interpreter's teardown would only add
    # 5-10 ms to every stop() the application waits for (issue 30).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(status)
