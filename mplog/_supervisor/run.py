"""``ServiceRun``: the pieces one ``LogService.start()`` builds and its ``stop()`` takes down.

In order: the spool's FIFO and counters, the worker config, the listener's config, health and
the supervisor (which starts the listener), the writer of control frames, ``worker.json``, the
main process's root logging, the capture of pool workers. Down, in order: the capture, the
root logging, the listener (a last look while this process logs nothing), the final report,
this process's channel, the spool. ``flush()`` is the barrier through the listener.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

from .._app.handler import close_channel
from .._common.config import ListenerConfig, ServiceConfig, WorkerConfig
from .._common.counters import STATE_STOPPED, Counters
from .._common.spool import RING_HEADER, place_spool, ring_capacity
from .._common.transport import K_FLUSH, K_NOTICE, K_STOP
from .children import ChildCapture
from .fileset import FileSetLock, check_directory, private_directory
from .health import Health, down_report
from .mainlog import RootLogging
from .spooldir import SpoolDirectory
from .supervisor import Supervisor, write_health_file

__all__ = ["ServiceRun"]


class ServiceRun:
    """One run of a service in the process that started it."""

    def __init__(self, cfg: ServiceConfig, spool: SpoolDirectory, ring_bytes: int) -> None:
        self.config = cfg
        self.spool: Optional[SpoolDirectory] = spool  # None once closed
        self.ring_bytes = ring_bytes
        self.worker: Optional[WorkerConfig] = None
        self.health: Optional[Health] = None
        self.supervisor: Optional[Supervisor] = None
        self.root = RootLogging()
        self.capture = ChildCapture(cfg)
        self._tokens = itertools.count(1)
        self._flush_lock = threading.Lock()
        self._diverted_flushed = 0  # records sent to stderr that an earlier flush() reported

    # -- up ----------------------------------------------------------------------------------
    @classmethod
    def launch(cls, cfg: ServiceConfig, file_lock: FileSetLock, flush_hook: Callable[[float], Any]) -> "ServiceRun":
        """The whole of a start: the log directory checked, the spool placed where there is room
        for a ring, the file set's lock taken, then every piece started. If any step fails, what
        was made is taken down and the lock released before the error reaches the caller."""
        check_directory(cfg.directory, (cfg.simplified_path, cfg.full_path))
        ring_bytes = ring_capacity(cfg.queue_size)
        placement = place_spool(RING_HEADER + ring_bytes)
        file_lock.acquire()  # one writer per file set
        run = None
        try:
            run = cls(cfg, SpoolDirectory.make(cfg, placement), ring_bytes)
            run.start(flush_hook)
        except BaseException:
            if run is not None:
                run.close(None)
            file_lock.release()
            raise
        if placement.notice:
            run.notice(placement.notice)
        return run

    def start(self, flush_hook: Callable[[float], Any]) -> None:
        cfg = self.config
        spool = self.spool
        assert spool is not None
        # Pool workers started before the service are children already; asked before the
        # listener, our own child, is one.
        self.capture.look_for_strays()
        counters = spool.open()
        self.worker = _worker_config(cfg, spool, self.ring_bytes)
        listener = _listener_config(cfg, spool, self.capture.path())
        self.health = Health(cfg, counters, spool.path, self.ring_bytes)
        self.supervisor = Supervisor(cfg, counters, listener, self.health)
        self.supervisor.start()
        spool.open_writer()
        spool.publish(self.worker)
        self.root.attach(self.worker, cfg.capture_warnings, flush_hook)
        self.supervisor.write_health_file()
        if self.capture.enabled():
            self.capture.publish(self.worker, self.notice)

    def live_worker(self) -> Optional[WorkerConfig]:
        """The worker config while the service runs, as its counters say: read in a forked
        copy of the main process, where this object is a copy too."""
        cfg = self.worker
        if cfg is None:
            return None
        try:
            counters = Counters.open(cfg.counters_path)
        except OSError:
            return None  # the spool is gone: the service has stopped
        try:
            return cfg if counters.get("state") != STATE_STOPPED else None
        finally:
            counters.close()

    # -- to the listener ---------------------------------------------------------------------
    def send(self, kind: int, payload: bytes, deadline: Optional[float]) -> bool:
        spool = self.spool
        return spool is not None and spool.send(kind, payload, deadline)

    def notice(self, text: str) -> None:
        self.send(K_NOTICE, text.encode("utf-8", "backslashreplace"), time.monotonic() + 1.0)

    def flush(self, timeout: float) -> bool:
        """See LogService.flush: a token through the FIFO, confirmed by the listener."""
        supervisor = self.supervisor
        assert supervisor is not None
        deadline = time.monotonic() + timeout
        token = next(self._tokens)
        frame = struct.pack("<q", token)

        def send() -> None:
            self.send(K_FLUSH, frame, deadline)

        with self._flush_lock:
            if not self.send(K_FLUSH, frame, deadline):
                return False
            flushed = supervisor.wait_flushed(token, deadline, send)
            return self._nothing_diverted() and flushed

    def _nothing_diverted(self) -> bool:
        """False if records went to stderr instead of the files since the last call (a stopped
        or missing spool, a listener that could not write): flush() must not say "written"."""
        if self.health is None:
            return True
        diverted = self.health.diverted()
        if diverted > self._diverted_flushed:
            self._diverted_flushed = diverted
            return False
        return True

    # -- down --------------------------------------------------------------------------------
    def stop_taking(self, restore: bool) -> None:
        """No new child joins a service that is stopping, and the root logger is given back;
        at exit (``restore`` False) our handler stays on the root: a record logged later (a
        handler's close, an atexit function registered before logging was imported) finds the
        service stopped and goes to stderr as one simplified line."""
        self.capture.withdraw()
        if restore:
            self.root.restore()
        else:
            self.root.unhook()

    def stop_listener(self, deadline: float) -> None:
        supervisor = self.supervisor
        if supervisor is None:
            return
        channel = self.root.handler.channel if self.root.handler is not None else None
        # No record of this process in flight while the listener takes its last look: then it
        # need not wait for any (``quiet``), unless other processes log.
        with channel.quiesced(0.5) if channel is not None else contextlib.nullcontext(True) as quiet:

            def send_stop(budget: float, dl: float) -> bool:
                return self.send(K_STOP, struct.pack("<dB", budget, bool(quiet)), dl)

            supervisor.stop(deadline, send_stop)

    def final_report(self) -> Dict[str, Any]:
        if self.health is not None and self.supervisor is not None:
            final = self.health.report(self.supervisor, final=True)
        else:
            final = down_report(self.config)
        try:
            # A probe must read "down" now, not the last running report.
            write_health_file(self.config.health_path, final)
        except OSError:
            pass
        return final

    def close(self, final: Optional[Dict[str, Any]]) -> None:
        """Release what this process holds; ``final`` learns of a spool kept for its records."""
        self.capture.withdraw()
        if self.worker is not None:
            close_channel(self.worker)  # this process's ring, its counters, its doorbell
        if self.spool is not None:
            kept = self.spool.close()
            if kept is not None and final is not None:
                final["spool_kept"] = kept
            self.spool = None


def _worker_config(cfg: ServiceConfig, spool: SpoolDirectory, ring_bytes: int) -> WorkerConfig:
    """What every process of the application needs to log to this service."""
    return WorkerConfig(
        fifo_path=spool.fifo, counters_path=spool.counters_path, level=cfg.level, overflow=cfg.overflow,
        overflow_timeout=cfg.overflow_timeout, capture_warnings=cfg.capture_warnings,
        service_id=os.urandom(16).hex(),  # uuid4's randomness without uuid's libuuid in every fork
        simplified_level=cfg.simplified_level, queue_size=cfg.queue_size, ring_bytes=ring_bytes,
        owner_pid=os.getpid(), capture_output=cfg.capture_output,
        lean=cfg.simplified_format is None and cfg.full_format is None)


def _listener_config(cfg: ServiceConfig, spool: SpoolDirectory, capture_dir: Optional[str]) -> ListenerConfig:
    """What the listener process is started with (a fresh interpreter reads it back)."""
    colour = (cfg.console is not None and sys.stderr is not None and sys.stderr.isatty()
              and not os.environ.get("NO_COLOR"))
    return ListenerConfig(
        fifo_path=spool.fifo, counters_path=spool.counters_path, runtime_dir=spool.path,
        simplified_path=str(cfg.simplified_path), full_path=str(cfg.full_path),
        level=cfg.level, simplified_level=cfg.simplified_level,
        flush_count=cfg.flush_count, flush_interval=cfg.flush_interval, shutdown_timeout=cfg.shutdown_timeout,
        console=cfg.console, console_colour=bool(colour),
        simplified_format=cfg.simplified_format, full_format=cfg.full_format, datefmt=cfg.datefmt,
        file_mode=cfg.file_mode, rotate_bytes=cfg.rotate_bytes, rotate_interval=cfg.rotate_interval,
        backup_count=cfg.backup_count, compress=cfg.compress, syslog=cfg.syslog, syslog_level=cfg.syslog_level,
        recover=spool.leftovers, follow_symlinks=private_directory(cfg.directory),
        capture_dir=capture_dir)
