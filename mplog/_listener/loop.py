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
batch is announced first (``journal``), so a listener that starts after a killed one carries on
exactly where the dead one stopped.

The rooms: ``Listener`` (here) is the loop, its housekeeping, and the wiring of the parts;
``Intake`` (``intake``) takes batches from the rings (``SpoolReader``) and writes them;
``Batch`` (``batch``) formats records into the texts of one batch; ``Journal`` the batch
journal; ``FileSet`` (``files``) the two files; ``Control`` (``control``) the protocol with the
supervisor; ``Ends`` (``ends``) the processes of the service and the records of their ends, read
by ``ExitWatch`` (``exits``), whose pidfds wake this loop like the FIFO does; ``Shutdown``
(``shutdown``) the last drain and the final counts; ``Vitals`` (``vitals``) the listener's
figures for health; ``SyslogLink`` (``syslog``) the forwarder.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from .._common.config import ListenerConfig
from .._common.counters import Counters
from .._common.spool import SpoolReader
from .batch import Batch
from .control import Control
from .ends import Ends
from .exits import ExitWatch
from .files import FileSet
from .intake import Intake
from .journal import Journal
from .shutdown import Shutdown
from .vitals import Vitals

if TYPE_CHECKING:  # imported only where syslog is configured
    from .syslog import SyslogLink

__all__ = ["Listener", "main"]

_IDLE_POLL_MS = 100  # a missed doorbell (see Listener.sleep) costs at most this much latency


class Listener:
    """The loop: take and write batches while records flow, sleep on the FIFO and the pidfds
    when none do, keep house once a second, and end as the supervisor or the signals say."""

    def __init__(self, cfg: ListenerConfig) -> None:
        self.cfg = cfg
        self.counters = c = Counters.open(cfg.counters_path)
        self.flush_count = cfg.flush_count
        self.files = FileSet(cfg.simplified_path, cfg.full_path, cfg.file_mode, cfg.rotate_bytes,
                             cfg.rotate_interval, cfg.backup_count, cfg.compress, cfg.follow_symlinks)
        # Housekeeping (logrotate, rotation by age) runs once a second, or as often as a shorter
        # rotate_interval needs.
        self.housekeeping_every = min(1.0, cfg.rotate_interval / 2) if cfg.rotate_interval else 1.0
        self.syslog: Optional["SyslogLink"] = None
        if cfg.syslog:
            from .syslog import SyslogLink  # its thread and sockets only where it is configured
            self.syslog = SyslogLink(cfg.syslog, cfg.syslog_level or logging.DEBUG, c)
        self.batch = Batch(cfg, c, self.syslog.forwarder if self.syslog is not None else None)
        self.reader = SpoolReader(cfg.runtime_dir, c)
        self.watch = ExitWatch(c, cfg.runtime_dir, cfg.parent_pid or os.getppid())
        self.pollers: List["select.poll"] = []  # the loop's: each also waits on the watch's pidfds
        self.journal = Journal(c)
        # The ends are written through the intake, and the intake writes the ends its batches
        # free: the intake is made second and handed to the ends through this call.
        self.ends = Ends(cfg.level, self.watch, self.reader, self.batch, self.pollers, lambda: self.intake.write_own())
        self.intake = Intake(cfg, c, self.reader, self.batch, self.files, self.journal, self.ends)
        self.control = Control(c, self.intake, cfg.reply_fd, self.reopen)
        self.shutdown = Shutdown(cfg, c, self.intake, self.ends, self.control, self.syslog)
        self.reopen_requested = False  # SIGHUP, or K_REOPEN
        self.terminated = 0.0  # when SIGTERM came (0: it did not)
        self.vitals: Optional[Vitals] = None

    def start(self) -> int:
        """Open the files, settle a dead predecessor's batch, recover earlier runs."""
        return self.intake.start()

    def housekeeping(self) -> None:
        """Once a second: follow logrotate, rotate by age, retire the rings of dead processes."""
        self.intake.follow_files(self.reopen_requested)
        self.reopen_requested = False
        self.ends.refresh()
        for w in self.watch.unpolled_ended():
            self.ends.on_exit(w)
        self.watch.open_fifos()
        for index, ring in self.reader.rings.items():
            if ring.last is not None and ring.last is not ring.stamped:
                ring.stamped = ring.last
                self.watch.stamp(index, ring.last)
        self.reader.retire(keep=self.watch.by_slot)
        if self.syslog is not None:
            self.syslog.publish()
        if self.vitals is not None:
            self.vitals.sample(time.monotonic())

    def reopen(self) -> None:
        """K_REOPEN: write what is taken, then reopen the files (logrotate moved them)."""
        self.intake.pump()
        self.reopen_requested = True
        self.housekeeping()

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
            self.intake.notice(f"listener restarted after {reason} (a late notice: the listener started after it "
                               "died before writing it); 0 records lost")
            c.add("restarts_noted")
        if cfg.restart_reason:
            self.intake.notice(f"listener restarted after {cfg.restart_reason}; 0 records lost")
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
        self.vitals = self.intake.vitals = Vitals(c, parent)
        self.control.reply()  # tell the supervisor we are up
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
        control, ends, pump, reader = self.control, self.ends, self.intake.pump, self.reader
        last_housekeeping = time.monotonic()
        parent_gone = False
        while True:
            control.read(fifo)
            if self.watch.behind:  # a process just claimed a slot: watch it from now
                ends.refresh()
            busy = backlog = False
            for _ in range(64):  # bounded: control messages and housekeeping get their turn
                n = pump()
                if not n:
                    break
                busy = True
                # A full batch, or a ring cut by its byte budget: more is waiting. Anything
                # less: the rings are drained for now.
                backlog = n >= self.flush_count or reader.cut
                if not backlog:
                    break
            if backlog:  # behind: no pause (writers may be waiting for room), events only
                events = pause.poll(0)
            elif busy:  # records trickle in: let them gather into one batch
                events = pause.poll(5)
            elif control.stopping:  # asked to stop: finish now, not after a sleep (stop() waits)
                events = pause.poll(0)
            else:
                events = self.sleep(poller)
            for fd, _ev in events:
                if fd == parent_fd:
                    parent_gone = True
            if events:
                ends.on_exits(events)
            now = time.monotonic()
            if now - last_housekeeping >= self.housekeeping_every or self.reopen_requested:
                last_housekeeping = now
                self.housekeeping()
                if parent_fd < 0 and os.getppid() != parent:
                    parent_gone = True
            if control.stopping:
                control.read(fifo)
                self.shutdown.finish("stopped", control.stop_deadline)
                return 0
            if parent_gone:
                control.read(fifo)
                self.shutdown.after_the_application()
                return 0
            if self.terminated and now - self.terminated >= 1.0:
                # SIGTERM to this process alone (the application lives on and did not stop us):
                # everything taken is written; die of it, so the supervisor names the exit and
                # starts a successor at once. The spool keeps what came after.
                pump()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

    def sleep(self, poller: "select.poll") -> List[Tuple[int, int]]:
        """Every ring is empty: sleep until a doorbell, a control message or a timeout."""
        c = self.counters
        c.set("sleeping", 1)
        # A writer that published before seeing the flag set gets no bell: look once more.
        # (Between the two processes' store and load there is no fence; the poll timeout
        # bounds the latency of the rare record that slips through.)
        self.ends.refresh()
        if self.reader.has_backlog():
            c.set("sleeping", 0)
            return []
        events = poller.poll(_IDLE_POLL_MS if not self.terminated else 20)
        c.set("sleeping", 0)
        return events


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
