"""The listener process: the only code that opens, writes or closes the log files.

Data flow::

    workers ──write(frame ≤ PIPE_BUF)──▶ FIFO ──read──▶ FrameParser ──▶ deserialize
        ──▶ SimplifiedFormatter / FullFormatter ──▶ one os.write per file per batch
        ──▶ shared counters (received, written) ──▶ reply pipe (flush barrier)

It runs as ``python -m mplog._listener CONFIG`` (a fresh interpreter, whatever start method the
application's pools use: the user's ``__main__`` is never re-imported here, and no thread of the
application is inherited). It ignores SIGINT, so Ctrl-C in the application cannot lose the
tail, and it drains and exits by itself when its parent dies, even by SIGKILL.

Exactness across kills: records are written with ``os.write`` straight from the batch, with no
user-space buffer, and each batch is announced in the shared counters before it is written
(``pending``, the files' sizes before and after). A listener that starts after a killed one
settles that batch from the files' sizes, and counts what the dead one had read but not written.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from ._counters import Counters, settle_accounts
from ._files import Compressor, LogFile
from ._format import (SEPARATOR, FullFormatter, JsonFormatter, SimplifiedFormatter, StdlibFormatter, Timestamps, colour,
                      format_both)
from ._record import TEXT_VERSION, Formatted, Record, deserialize, make_record
from ._transport import K_FLUSH, K_NOTICE, K_RECORD, K_REOPEN, K_STOP, FrameParser

__all__ = ["Listener", "main"]

_MAX_DISTINCT_WARNINGS = 1000
_BLOCK_END = SEPARATOR + "\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited but unreaped child is a zombie: as good as dead for its records
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _make_formatters(cfg: Dict[str, Any], stamps: Timestamps) -> Tuple[Any, Any]:
    simple: Any = SimplifiedFormatter(stamps)
    full: Any = FullFormatter(stamps)
    if cfg.get("simplified_format"):
        simple = StdlibFormatter(cfg["simplified_format"], cfg.get("datefmt"))
    if cfg.get("full_format") == "jsonl":
        full = JsonFormatter()
    elif cfg.get("full_format"):
        full = StdlibFormatter(cfg["full_format"], cfg.get("datefmt"))
    return simple, full


class Listener:
    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.cfg = cfg
        self.counters = Counters.open(cfg["counters_path"])
        self.level = cfg["level"]
        self.simplified_level = cfg["simplified_level"]
        self.flush_count = cfg["flush_count"]
        self.console: Optional[int] = cfg.get("console")
        self.console_colour = bool(cfg.get("console_colour"))
        self.console_fd: int = cfg.get("console_fd", 2) if cfg.get("console_fd") is not None else 2
        self.stamps = Timestamps()
        self.simple, self.full = _make_formatters(cfg, self.stamps)
        # Both default formats: format them together (shared timestamp and message checks).
        self.fused = type(self.simple) is SimplifiedFormatter and type(self.full) is FullFormatter
        mode = cfg.get("file_mode")
        self.simp = LogFile(cfg["simplified_path"], mode)
        self.fullf = LogFile(cfg["full_path"], mode)
        self.rotate_bytes: Optional[int] = cfg.get("rotate_bytes")
        self.rotate_interval: Optional[float] = cfg.get("rotate_interval")
        self.backup_count: int = cfg.get("backup_count", 5)
        self.compressor = Compressor() if cfg.get("compress") else None
        self.reopen_requested = False
        self.error: Optional[str] = None
        self.forwarder: Any = None
        if cfg.get("syslog"):
            from ._syslog import SyslogForwarder
            host, port = cfg["syslog"]
            self.forwarder = SyslogForwarder(host, int(port), level=cfg.get("syslog_level") or logging.DEBUG)
            # Counters are cumulative over listener restarts; a killed listener's buffered
            # syslog messages are gone with it (its files' copy is not).
            self._syslog_base = {k: self.counters.get("syslog_" + k)
                                 for k in ("forwarded", "dropped", "lost", "reconnects", "resets")}
        self.parser = FrameParser()
        # A kill loses what was read and not yet written: keep one read near one flush window
        # (records' frames are rarely under 128 bytes).
        self.read_size = max(4096, self.flush_count * 128)
        # Fault injection for the tests: exit with status 1 on a record with this message.
        self.exit_on: Optional[str] = os.environ.get("MPLOG_TEST_EXIT_ON") or None
        self.warnings: Dict[str, int] = {}
        self.reply_fd: int = cfg.get("reply_fd", -1)
        self.stopping = False
        self.stop_deadline = 0.0
        # batch state
        self._full: List[str] = []
        self._simp: List[str] = []
        self._cons: List[str] = []
        self._n = 0

    # -- files ---------------------------------------------------------------------------
    def open_files(self) -> None:
        """Open both files; a failure is reported (degraded, records to stderr), not fatal."""
        for f in (self.simp, self.fullf):
            try:
                f.open()
            except OSError as exc:
                self._error(f"cannot open {f.path}: {exc.strerror or exc}")

    def close_files(self) -> None:
        self.simp.close()
        self.fullf.close()

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

    def housekeeping(self) -> None:
        """Once a second: follow logrotate (moved, deleted, truncated), rotate, retry errors."""
        c = self.counters
        for f in (self.simp, self.fullf):
            if f.fd < 0 or f.moved() or self.reopen_requested:
                try:
                    f.open()
                    c.add("reopens")
                except OSError as exc:
                    f.close()
                    self._error(f"cannot open {f.path}: {exc.strerror or exc}")
                continue
            f.check_truncated()
            due = ((self.rotate_bytes is not None and f.size >= self.rotate_bytes)
                   or (self.rotate_interval is not None and time.time() - f.opened_at >= self.rotate_interval))
            if due and f.size > 0:
                self.rotate(f)
        self.reopen_requested = False
        self.publish_syslog()

    def publish_syslog(self) -> None:
        if self.forwarder is None:
            return
        c = self.counters
        st = self.forwarder.state()
        for key, base in self._syslog_base.items():
            c.set("syslog_" + key, base + st[key])
        c.set("syslog_connected", 1 if st["connected"] else 0)
        c.set("syslog_pending", st["pending"] + st["in_flight"])

    def rotate(self, f: LogFile) -> None:
        try:
            f.rotate(self.backup_count, self.compressor)
            self.counters.add("rotations")
        except OSError as exc:
            self._error(f"cannot rotate {f.path}: {exc.strerror or exc}")

    def settle_previous(self) -> int:
        """Settle the batch a killed listener announced, count what it held; return the loss."""
        c = self.counters
        lost = 0
        pending = c.get("pending")
        if pending:
            if c.get("written") == c.get("pending_base"):  # it died before counting the batch
                # The batch went to the files the dead listener held, which a logrotate may have
                # renamed since: find them by inode.
                full = self._find_by_inode(self.fullf, c.get("full_ino"))
                simp = self._find_by_inode(self.simp, c.get("simp_ino"))
                if full is not None and full[1] >= c.get("full_expected"):
                    c.add("written", pending)  # the write went through
                else:
                    c.add("lost_listener", pending)
                    lost += pending
                    # Cut a torn tail so the files hold only whole blocks.
                    for found, start in ((full, c.get("full_start")), (simp, c.get("simp_start"))):
                        if found is not None and start < found[1]:
                            try:
                                os.truncate(found[0], start)
                            except OSError:
                                pass
                    for f in (self.fullf, self.simp):
                        if f.fd >= 0:
                            f.size = os.fstat(f.fd).st_size
            c.set("pending", 0)
        # Whatever the previous listener had read but not written died with it.
        held = c.get("received") - c.get("written") - c.get("lost_listener") - c.get("stderr_records")
        if held > 0:
            c.add("lost_listener", held)
            lost += held
        return lost

    @staticmethod
    def _find_by_inode(f: LogFile, ino: int) -> Optional[Tuple[str, int]]:
        """(path, size) of the file with inode ``ino``: the current one, or a rotated copy."""
        if f.fd >= 0 and f.ident[1] == ino:
            return f.path, f.size
        directory = os.path.dirname(f.path) or "."
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.inode() == ino and entry.is_file(follow_symlinks=False):
                        return entry.path, entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
        return None

    # -- records -------------------------------------------------------------------------
    def handle(self, rec: Record, counted: bool = True) -> None:
        try:
            levelno = rec.levelno
            if self.fused:
                full, line = format_both(rec, self.stamps, self.full, self.simple,
                                         levelno >= self.simplified_level or rec.user)
            else:
                full = self.full.format(rec)
                line = self.simple.format(rec) if levelno >= self.simplified_level or rec.user else None
            if line is not None:
                self._simp.append(line)
                if self.console is not None and levelno >= self.console:
                    self._cons.append(colour(line, levelno) if self.console_colour else line)
            self._full.append(full)
            if self.forwarder is not None:
                self.forwarder.submit(rec)
            if logging.WARNING <= levelno < logging.ERROR and rec.name != "mplog":
                key = rec.msg.split("\n", 1)[0][:200]
                if key in self.warnings or len(self.warnings) < _MAX_DISTINCT_WARNINGS:
                    self.warnings[key] = self.warnings.get(key, 0) + 1
        except Exception as exc:  # a bad field or a formatter bug costs one record, not the listener
            self.counters.add("replaced_listener")
            self._full.append(self.full.format(make_record(
                time.time(), logging.ERROR, "mplog", f"<record could not be formatted: {exc!r}>")))
        if counted:
            self._n += 1
            if self._n >= self.flush_count:
                self.write_batch()

    def handle_text(self, t: Formatted) -> None:
        """A record formatted by the process that logged it: append its texts."""
        full, simple, levelno = t.full, t.simple, t.levelno
        if not (type(full) is str and full.startswith("[") and full.endswith(_BLOCK_END)
                and type(levelno) is int and (simple is None or (type(simple) is str and simple.endswith("\n")))):
            self.counters.add("replaced_listener")  # not what our writers send: a placeholder
            self.handle(make_record(time.time(), logging.WARNING, "mplog", "<malformed pre-formatted record>"))
            return
        self._full.append(full)
        if simple is not None:
            self._simp.append(simple)
            if self.console is not None and levelno >= self.console:
                self._cons.append(colour(simple, levelno) if self.console_colour else simple)
        warning = t.warning
        if warning and type(warning) is str:
            if warning in self.warnings or len(self.warnings) < _MAX_DISTINCT_WARNINGS:
                self.warnings[warning] = self.warnings.get(warning, 0) + 1
        self._n += 1
        if self._n >= self.flush_count:
            self.write_batch()

    def write_batch(self) -> None:
        n = self._n
        if not n and not self._full:
            return
        full = "".join(self._full).encode("utf-8", "backslashreplace")
        simp = "".join(self._simp).encode("utf-8", "backslashreplace")
        cons = "".join(self._cons)
        self._full.clear()
        self._simp.clear()
        self._cons.clear()
        self._n = 0
        self._write(full, simp, n)
        if cons:
            self._console(cons)

    def _console(self, text: str) -> None:
        # Non-blocking pipe to the main process: if it is not reading, the echo is skipped;
        # the record itself is in the files.
        try:
            _write_all(self.console_fd, text.encode("utf-8", "backslashreplace"))
        except OSError:
            pass

    def announce(self, full_len: int, simp_len: int, n: int) -> None:
        """Record, before writing it, where a batch of ``n`` records will land (settle_previous)."""
        c = self.counters
        c.set("pending_base", c.get("written"))
        c.set("full_start", self.fullf.size)
        c.set("full_expected", self.fullf.size + full_len)
        c.set("simp_start", self.simp.size)
        c.set("simp_expected", self.simp.size + simp_len)
        c.set("full_ino", self.fullf.ident[1])
        c.set("simp_ino", self.simp.ident[1])
        c.set("pending", n)  # last: a non-zero pending means the fields above are valid

    def _write(self, full: bytes, simp: bytes, n: int) -> None:
        """Write one batch to both files, announced first in the counters so that a listener
        killed half-way can be settled exactly by the next one (``n`` 0: a notice, uncounted)."""
        c = self.counters
        if n:
            self.announce(len(full), len(simp), n)
        try:
            if simp:
                self.simp.write(simp)
            self.fullf.write(full)
        except OSError as exc:
            self._write_failed(exc, full, n)
        else:
            if n:
                c.add("written", n)
            if self.rotate_bytes is not None:
                for f in (self.simp, self.fullf):
                    if f.size >= self.rotate_bytes:
                        self.rotate(f)
            if self.error is not None:
                self.error = None
                c.set_text("")
                c.set("error_ns", 0)
        c.set("pending", 0)
        c.set("last_write_ns", time.time_ns())

    def _write_failed(self, exc: OSError, full: bytes, n: int) -> None:
        # Disk full, EIO, EFBIG, a file we cannot reopen: the records go to stderr, counted as
        # diverted, and the next batch tries the file again (it resumes when space returns).
        c = self.counters
        c.add("write_errors")
        path = getattr(exc, "filename", None) or self.cfg["full_path"]
        self._error(f"cannot write {path}: {exc.strerror or exc}")
        if n:
            c.add("stderr_records", n)
            try:
                _write_all(2, full)
            except OSError:
                pass

    def notice(self, msg: str, levelno: int = logging.WARNING) -> None:
        """Write one of mplog's own records, straight into the files (not counted as sent)."""
        self.write_batch()
        rec = make_record(time.time(), levelno, "mplog", msg, pathname=__file__, funcName="listener",
                          processName="mplog-listener", process=os.getpid(), threadName="MainThread", user=True)
        self.handle(rec, counted=False)
        self.write_batch()  # a batch of no application record: written, not counted

    # -- the loop ------------------------------------------------------------------------
    def dispatch(self, messages: List[Tuple[int, int, int, int, bytes]]) -> None:
        c = self.counters
        records = 0
        handle = self.handle
        for kind, pid, _tid, _seq, payload in messages:
            if kind == K_RECORD:
                if not records:
                    # Count what was taken from the pipe before doing anything slow with it.
                    c.add("received", sum(1 for m in messages if m[0] == K_RECORD))
                records += 1
                try:
                    rec = deserialize(payload)
                except ValueError as exc:
                    c.add("replaced_listener")
                    rec = make_record(time.time(), logging.WARNING, "mplog",
                                      f"<undecodable record from pid {pid}: {exc}>")
                if rec[0] == TEXT_VERSION:
                    if self.exit_on is not None and f"  Message: {self.exit_on}\n" in rec.full:
                        os._exit(1)
                    self.handle_text(rec)
                    continue
                if self.exit_on is not None and rec.msg == self.exit_on:
                    os._exit(1)
                handle(rec)
            elif kind == K_FLUSH:
                self.write_batch()
                self._sync_parser_counts()  # a flush() caller may read the counters next
                token = struct.unpack("<q", payload[:8])[0] if len(payload) >= 8 else 0
                if token > c.get("flushed_token"):
                    c.set("flushed_token", token)
                self._reply()
            elif kind == K_STOP:
                self.stopping = True
                budget = struct.unpack("<d", payload[:8])[0] if len(payload) >= 8 else 1.0
                self.stop_deadline = time.monotonic() + max(0.0, budget)
            elif kind == K_REOPEN:
                self.write_batch()
                self.reopen_requested = True
                self.housekeeping()
            elif kind == K_NOTICE:
                self.notice(payload.decode("utf-8", "backslashreplace"))
        self._sync_parser_counts()

    def _sync_parser_counts(self) -> None:
        c = self.counters
        p = self.parser
        if p.torn != self._torn_seen:
            c.add("torn", p.torn - self._torn_seen)
            self._torn_seen = p.torn
        if p.malformed != self._malformed_seen:
            c.add("malformed", p.malformed - self._malformed_seen)
            self._malformed_seen = p.malformed

    _torn_seen = 0
    _malformed_seen = 0

    def _reply(self) -> None:
        if self.reply_fd >= 0:
            try:
                os.write(self.reply_fd, b"!")
            except OSError:
                pass  # the main process is not reading; it polls the counter too

    def read_available(self, fd: int) -> bool:
        """Read once (and finish a frame the read cut). False at EOF or when nothing was there."""
        try:
            data = os.read(fd, self.read_size)
        except BlockingIOError:
            return False
        if not data:
            return False
        messages = self.parser.feed(data)
        need = self.parser.pending_bytes
        if need:
            # The rest of a frame the read cut is already in the pipe (frames are written whole):
            # take it now, so a kill of this process can leave no partial frame behind it.
            try:
                more = os.read(fd, need)
                if more:
                    messages += self.parser.feed(more)
            except BlockingIOError:
                pass
        self.dispatch(messages)
        return True

    def run(self) -> int:
        cfg = self.cfg
        self.open_files()
        lost = self.settle_previous()
        c = self.counters
        c.set("listener_pid", os.getpid())
        fifo = os.open(cfg["fifo_path"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if cfg.get("restart_reason"):
            self.notice(f"listener restarted after {cfg['restart_reason']}; {lost} records lost")
        poller = select.poll()
        poller.register(fifo, select.POLLIN)
        parent = cfg.get("parent_pid") or os.getppid()
        parent_fd = -1
        try:
            parent_fd = os.pidfd_open(parent)  # type: ignore[attr-defined]
            poller.register(parent_fd, select.POLLIN)
        except (AttributeError, OSError):
            parent_fd = -1
        self._reply()  # tell the supervisor we are up
        idle_ms = int(min(cfg.get("flush_interval", 1.0), 1.0) * 1000)
        # While records are flowing, pause between drains *without* waiting on the pipe: a
        # writer whose write() has to wake a sleeping reader pays for that wake-up (several
        # microseconds); a write into a pipe nobody waits on is a plain copy. The pause is far
        # below flush_interval, and short against the pipe's size (1 MiB is ~3,000 records).
        pause = select.poll()
        if parent_fd >= 0:
            pause.register(parent_fd, select.POLLIN)
        pause_ms = 5
        last_housekeeping = time.monotonic()
        parent_gone = False
        busy = False
        while True:
            if busy:
                events = pause.poll(pause_ms)
                events = events + [(fifo, select.POLLIN)]
            else:
                events = poller.poll(idle_ms)
            for fd, _ev in events:
                if fd == parent_fd:
                    parent_gone = True
            busy = False
            if events:
                # Drain what is there, in bounded reads, writing as we go.
                for _ in range(256):
                    if not self.read_available(fifo):
                        break
                    busy = True
                self.write_batch()
            now = time.monotonic()
            if now - last_housekeeping >= 1.0 or self.reopen_requested:
                last_housekeeping = now
                self.housekeeping()
                self.parser.expire(_pid_alive)
                self._sync_parser_counts()
                if parent_fd < 0 and os.getppid() != parent:
                    parent_gone = True
            if self.stopping:
                self.drain(fifo, self.stop_deadline)
                self.finish("stopped")
                return 0
            if parent_gone:
                self.drain(fifo, time.monotonic() + 2.0)
                self.notice("the application exited without stopping the log service", logging.WARNING)
                self.finish("stopped (application gone)")
                return 0

    def drain(self, fifo: int, deadline: float) -> None:
        while time.monotonic() < deadline and self.read_available(fifo):
            pass
        self.write_batch()
        self.parser.close()
        self._sync_parser_counts()

    def finish(self, how: str) -> None:
        c = self.counters
        totals = c.slot_totals()
        written = c.get("written")
        dropped = totals["dropped"]
        diverted = totals["diverted"] + c.get("stderr_records")
        lost = settle_accounts(totals["sent"], written, dropped, diverted,
                               c.get("torn") + c.get("lost_listener"), totals["in_doubt"])["lost"]
        summary = f"mplog {how}: {written} records written, {dropped} dropped, {lost} lost"
        if diverted:
            summary += f", {diverted} sent to stderr"
        warned = sorted(self.warnings.items(), key=lambda kv: (-kv[1], kv[0]))
        if warned:
            summary += f"; {len(warned)} distinct warning(s):"
            for text, count in warned[:50]:
                summary += f"\n{count:>6} x {text}"
            if len(warned) > 50:
                summary += f"\n   ... and {len(warned) - 50} more"
        self.notice(summary, logging.INFO)
        if self.forwarder is not None:
            self.forwarder.close(min(2.0, max(0.2, self.stop_deadline - time.monotonic())))
            self.publish_syslog()
        self.close_files()
        if self.compressor is not None:
            self.compressor.close(5.0)


def main(argv: Optional[List[str]] = None) -> int:
    # Before anything else: Ctrl-C goes to the whole process group, and must not lose the tail.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A file size limit (RLIMIT_FSIZE) must give EFBIG, which we handle, not kill us.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(argv[0])
    listener = Listener(cfg)
    if hasattr(signal, "SIGHUP"):
        # logrotate's postrotate convention: SIGHUP means reopen the files.
        def _hup(_signum: int, _frame: Any) -> None:
            listener.reopen_requested = True
        signal.signal(signal.SIGHUP, _hup)
    return listener.run()


if __name__ == "__main__":
    sys.exit(main())
