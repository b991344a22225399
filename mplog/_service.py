"""``LogService``: what the application holds. Owns the channel, the supervisor, the main
process's handler, and the exit hook."""

from __future__ import annotations

import atexit
import errno
import fcntl
import itertools
import logging
import os
import shutil
import stat
import struct
import sys
import tempfile
import termios
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ._config import ServiceConfig, WorkerConfig
from ._counters import Counters, settle_accounts
from ._supervisor import Supervisor, write_health_file
from ._transport import K_FLUSH, K_REOPEN, K_STOP, FifoWriter, set_pipe_size
from ._worker import MPQueueHandler, _service_read_fds, uninstall, worker_init

__all__ = ["LogService", "ServiceHandler"]

_BYTES_PER_RECORD = 320  # a typical record's frame: how queue_size becomes a pipe size (README: Transport)


def _runtime_dir() -> str:
    # tmpfs when there is one: the FIFO and counters never touch a disk.
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return tempfile.gettempdir()


def _check_directory(directory: Path, files: Any) -> None:
    """Raise OSError naming the path if the logs cannot live there. Opens nothing."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno or errno.EACCES, f"cannot create the log directory: {exc.strerror}",
                      str(directory)) from None
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the log directory is not a directory", str(directory))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "the log directory is not writable", str(directory))
    for path in files:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            # The listener opens with O_NOFOLLOW: a link planted at the log path is never followed.
            raise OSError(errno.ELOOP, "the log file is a symbolic link; refusing to follow it", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "the log file exists and is not a regular file", str(path))
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "the log file is not writable", str(path))


class LogService:
    """One listener process writing ``<directory>/<name>.log`` and ``<name>.debug.log`` for every
    process of the application. See the README for every option."""

    def __init__(self, directory: Union[str, "os.PathLike[str]"], name: str = "run", **options: Any) -> None:
        self.config = ServiceConfig.build(directory, name, **options)
        self._lock = threading.RLock()
        self._started = False
        self._stopped = False
        self._runtime: Optional[str] = None
        self._counters: Optional[Counters] = None
        self._supervisor: Optional[Supervisor] = None
        self._handler: Optional[MPQueueHandler] = None
        self._writer: Optional[FifoWriter] = None
        self._read_fd = -1
        self._pipe_bytes = 0
        self._worker_config: Optional[WorkerConfig] = None
        self._final: Optional[Dict[str, Any]] = None
        self._saved_root: Optional[tuple] = None
        self._tokens = itertools.count(1)
        self._flush_lock = threading.Lock()
        self._ps_main: Any = None
        self._saved_signals: list = []

    # -- paths and configs -----------------------------------------------------------------
    @property
    def simplified_path(self) -> Path:
        return self.config.simplified_path

    @property
    def full_path(self) -> Path:
        return self.config.full_path

    @property
    def health_path(self) -> Path:
        return self.config.health_path

    @property
    def worker_config(self) -> WorkerConfig:
        if self._worker_config is None:
            raise RuntimeError("the service is not started: call start() or use it as a context manager")
        return self._worker_config

    def pool_kwargs(self) -> Dict[str, Any]:
        """``initializer``/``initargs`` for ProcessPoolExecutor and multiprocessing.Pool."""
        return {"initializer": worker_init, "initargs": (self.worker_config,)}

    @property
    def queue(self) -> Any:
        """A queue-like object for the standard library's ``QueueHandler(svc.queue)``."""
        if self._handler is None:
            raise RuntimeError("the service is not started")
        return self._handler.queue

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "LogService":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "LogService":
        with self._lock:
            if self._started:
                if self._stopped:
                    raise RuntimeError("a stopped LogService cannot be started again; create a new one")
                return self
            cfg = self.config
            _check_directory(cfg.directory, (cfg.simplified_path, cfg.full_path))
            self._runtime = tempfile.mkdtemp(prefix="mplog-", dir=_runtime_dir())
            try:
                self._start_in(self._runtime)
            except BaseException:
                self._cleanup()
                raise
            self._started = True
            atexit.register(self._at_exit)
            return self

    def _start_in(self, runtime: str) -> None:
        cfg = self.config
        fifo = os.path.join(runtime, "fifo")
        counters_path = os.path.join(runtime, "counters")
        os.mkfifo(fifo, 0o600)
        self._counters = Counters.create(counters_path)
        # The main process holds a read end for the service's whole life: writers can always
        # open the FIFO, and the backlog survives while a killed listener is replaced.
        self._read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        _service_read_fds[self._read_fd] = os.getpid()
        self._pipe_bytes = set_pipe_size(self._read_fd, max(65536, cfg.queue_size * _BYTES_PER_RECORD))
        self._worker_config = WorkerConfig(
            fifo_path=fifo, counters_path=counters_path, level=cfg.level, overflow=cfg.overflow,
            overflow_timeout=cfg.overflow_timeout, capture_warnings=cfg.capture_warnings,
            service_id=uuid.uuid4().hex,
            # Custom formats and syslog need the record's fields in the listener.
            preformat=cfg.simplified_format is None and cfg.full_format is None and cfg.syslog is None,
            simplified_level=cfg.simplified_level)
        colour = (cfg.console is not None and sys.stderr is not None and sys.stderr.isatty()
                  and not os.environ.get("NO_COLOR"))
        listener_opts = {
            "fifo_path": fifo, "counters_path": counters_path,
            "simplified_path": str(cfg.simplified_path), "full_path": str(cfg.full_path),
            "level": cfg.level, "simplified_level": cfg.simplified_level,
            "flush_count": cfg.flush_count, "flush_interval": cfg.flush_interval,
            "console": cfg.console, "console_colour": bool(colour),
            "simplified_format": cfg.simplified_format, "full_format": cfg.full_format, "datefmt": cfg.datefmt,
            "file_mode": cfg.file_mode, "rotate_bytes": cfg.rotate_bytes, "rotate_interval": cfg.rotate_interval,
            "backup_count": cfg.backup_count, "compress": cfg.compress,
            "syslog": list(cfg.syslog) if cfg.syslog else None, "syslog_level": cfg.syslog_level,
        }
        self._supervisor = Supervisor(cfg, self._counters, fifo, counters_path, listener_opts)
        self._supervisor.health_source = self.health
        self._supervisor.start()
        self._writer = FifoWriter(fifo)
        # The main process logs through the service too, at ``level``; stop() restores the root.
        root = logging.getLogger()
        self._saved_root = (list(root.handlers), root.level, cfg.capture_warnings)
        self._handler = MPQueueHandler(self._worker_config)
        self._handler.queue._attach()
        root.addHandler(self._handler)
        root.setLevel(cfg.level)
        if cfg.capture_warnings:
            logging.captureWarnings(True)
        try:
            import psutil
            self._ps_main = psutil.Process()
        except Exception:
            self._ps_main = None
        self._supervisor.write_health_file()

    def _send_control(self, kind: int, payload: bytes, deadline: Optional[float]) -> bool:
        writer = self._writer
        if writer is None:
            return False
        try:
            return writer.write_frames(kind, payload, deadline)
        except OSError:
            return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Return True once every record logged before this call is in the files (False if that
        did not happen within ``timeout`` seconds)."""
        with self._lock:
            if not self._started or self._stopped or self._supervisor is None:
                return self._stopped
            supervisor = self._supervisor
        deadline = time.monotonic() + timeout
        token = next(self._tokens)
        frame = struct.pack("<q", token)

        def send() -> None:
            self._send_control(K_FLUSH, frame, deadline)

        with self._flush_lock:
            if not self._send_control(K_FLUSH, frame, deadline):
                return False
            return supervisor.wait_flushed(token, deadline, send)

    def install_signal_handlers(self, signals: Any = None) -> None:
        """Opt in: on SIGTERM or SIGINT, stop the service (every record logged before the signal
        is written), then let the signal do what it did before: SIGINT raises KeyboardInterrupt,
        SIGTERM ends the process with the usual status. A library takes no signal by default;
        call this from the main thread. ``stop()`` puts the previous handlers back."""
        import signal as _signal
        chosen = signals if signals is not None else (_signal.SIGTERM, _signal.SIGINT)
        for signum in chosen:
            previous = _signal.getsignal(signum)

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                self.stop()
                if callable(previous):
                    previous(num, frame)  # default_int_handler raises KeyboardInterrupt
                elif previous != _signal.SIG_IGN:
                    _signal.signal(num, _signal.SIG_DFL)
                    os.kill(os.getpid(), num)

            _signal.signal(signum, handler)
            self._saved_signals.append((signum, previous))

    def _restore_signals(self) -> None:
        import signal as _signal
        while self._saved_signals:
            signum, previous = self._saved_signals.pop()
            try:
                if _signal.getsignal(signum) is not previous:
                    _signal.signal(signum, previous if previous is not None else _signal.SIG_DFL)
            except (ValueError, OSError):  # not the main thread: leave it
                pass

    def reopen(self) -> None:
        """Ask the listener to reopen the log files (after an external logrotate)."""
        self._send_control(K_REOPEN, b"", time.monotonic() + 1.0)

    def stop(self) -> Dict[str, Any]:
        """Write every record logged before this call, stop the listener, restore the root
        logger. Idempotent. Returns within ``shutdown_timeout`` (+0.5 s) whatever the listener's
        state, and returns the final health report."""
        with self._lock:
            if self._stopped or not self._started:
                return self.health()
            self._stopped = True
            deadline = time.monotonic() + self.config.shutdown_timeout
            self._restore_root()
            self._restore_signals()
            atexit.unregister(self._at_exit)

            def send_stop(budget: float, dl: float) -> bool:
                return self._send_control(K_STOP, struct.pack("<d", budget), dl)

            supervisor = self._supervisor
            if supervisor is not None:
                supervisor.stop(deadline, send_stop)
            self._final = self._compute_health(final=True)
            try:
                # A probe must read "down" now, not the last running report.
                write_health_file(self.health_path, self._final)
            except OSError:
                pass
            self._cleanup()
            return self._final

    def _restore_root(self) -> None:
        root = logging.getLogger()
        if self._handler is not None:
            uninstall(self._handler)
            root.removeHandler(self._handler)
        if self._saved_root is not None:
            handlers, level, captured = self._saved_root
            root.setLevel(level)
            if captured:
                logging.captureWarnings(False)
            self._saved_root = None

    def _cleanup(self) -> None:
        if self._handler is not None:
            self._handler.queue.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._read_fd >= 0:
            _service_read_fds.pop(self._read_fd, None)
            try:
                os.close(self._read_fd)
            except OSError:
                pass
            self._read_fd = -1
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    def _at_exit(self) -> None:
        # Registered after multiprocessing is imported, so it runs before multiprocessing's own
        # exit function terminates children and joins feeder threads (atexit is LIFO).
        try:
            self.stop()
        except Exception as exc:
            try:
                os.write(2, f"mplog: stopping at exit failed: {exc}\n".encode())
            except OSError:
                pass

    # -- health ------------------------------------------------------------------------------
    def health(self) -> Dict[str, Any]:
        """A JSON-serialisable report: status, listener, restarts, queue, records, files."""
        if self._final is not None:
            return dict(self._final)
        if self._supervisor is None or self._counters is None:
            return {"status": "down", "records": {"sent": 0, "written": 0, "dropped": 0, "lost": 0},
                    "queue": {"depth": 0, "capacity": self.config.queue_size}}
        return self._compute_health(final=False)

    def _compute_health(self, final: bool) -> Dict[str, Any]:
        counters = self._counters
        supervisor = self._supervisor
        assert counters is not None and supervisor is not None
        snap = counters.snapshot()
        sent, written, dropped = snap["sent"], snap["written"], snap["dropped"]
        diverted = snap["diverted"] + snap["stderr_records"]
        counted_lost = snap["torn"] + snap["lost_listener"]
        in_flight = max(0, sent - dropped - snap["diverted"] - snap["received"] - snap["torn"])
        unattributed = 0
        extra: Dict[str, int] = {}
        if final:
            # Everything the listener could drain is in the files now: close the sum.
            settled = settle_accounts(sent, written, dropped, diverted, counted_lost, snap["in_doubt"])
            sent, lost, unattributed = settled["sent"], settled["lost"], settled["unattributed"]
            extra = {"in_doubt_sent": settled["in_doubt_sent"], "unexplained": settled["unexplained"]}
            in_flight = 0
        else:
            lost = counted_lost
        listener = supervisor.listener_info() if not final else {
            "pid": None, "alive": False, "status": "stopped", "cpu_percent": None,
            "rss_bytes": None, "num_fds": None, "uptime_s": None}
        last_write_ns = snap["last_write_ns"]
        stalled = (not final) and supervisor.progress_stalled(written, in_flight)
        if final or supervisor.state == "stopped":
            status = "down"
        elif supervisor.degraded or stalled or not listener["alive"] or snap["error_ns"]:
            status = "degraded"
        else:
            status = "healthy"
        depth_bytes = 0
        if self._read_fd >= 0 and not final:
            try:
                buf = fcntl.ioctl(self._read_fd, termios.FIONREAD, b"\0\0\0\0")
                depth_bytes = struct.unpack("i", buf)[0]
            except OSError:
                pass
        files = {}
        for key, path in (("simplified", self.simplified_path), ("full", self.full_path)):
            try:
                size: Optional[int] = os.stat(path).st_size
            except OSError:
                size = None
            files[key] = {"path": str(path), "size_bytes": size}
        report: Dict[str, Any] = {
            "status": status,
            "state": supervisor.state,
            "service": {"pid": os.getpid(), "create_time": self._main_create_time(), "name": self.config.name,
                        "directory": str(self.config.directory), "updated": time.time()},
            "listener": listener,
            "restarts": supervisor.restarts,
            "last_exit": supervisor.last_exit,
            "queue": {"depth": in_flight, "capacity": self.config.queue_size, "bytes": depth_bytes,
                      "capacity_bytes": self._pipe_bytes},
            "records": {"sent": sent, "written": written, "dropped": dropped, "lost": lost,
                        "diverted": diverted, "torn": snap["torn"], "lost_with_listener": snap["lost_listener"],
                        "unattributed_lost": unattributed, "replaced": snap["replaced"] + snap["replaced_listener"],
                        "malformed_frames": snap["malformed"], **extra},
            "rotations": snap["rotations"],
            "reopens": snap["reopens"],
            "last_write_age_s": (round(time.time() - last_write_ns / 1e9, 3) if last_write_ns else None),
            "files": files,
            "processes": snap["processes"],
        }
        if self.config.syslog:
            report["syslog"] = {
                "host": self.config.syslog[0], "port": self.config.syslog[1],
                "connected": bool(snap["syslog_connected"]), "forwarded": snap["syslog_forwarded"],
                "dropped": snap["syslog_dropped"], "lost": snap["syslog_lost"], "pending": snap["syslog_pending"],
                "reconnects": snap["syslog_reconnects"], "resets": snap["syslog_resets"],
            }
        if snap["error_ns"]:
            report["last_error"] = {"message": counters.get_text(), "time": snap["error_ns"] / 1e9}
            report["reason"] = report["last_error"]["message"]
        if stalled:
            report["reason"] = "records are waiting and none was written for 2 s"
        return report

    def _main_create_time(self) -> Optional[float]:
        try:
            return self._ps_main.create_time() if self._ps_main is not None else None
        except Exception:
            return None

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self._started else "new")
        return f"<LogService {self.config.directory}/{self.config.name} {state}>"




class ServiceHandler(logging.Handler):
    """A handler that starts its own ``LogService``: the way to declare mplog in
    ``logging.config.dictConfig`` (or YAML), or ``fileConfig`` INI files::

        "handlers": {"mplog": {"class": "mplog.ServiceHandler", "directory": "logs",
                               "name": "run", "simplified_level": "INFO"}}

    Every keyword is a ``LogService`` option. The service is stopped at exit (or call
    ``handler.service.stop()``); ``handler.service`` gives ``pool_kwargs()`` for the pools.

    Not a ``QueueHandler`` subclass on purpose: since Python 3.12, dictConfig builds every
    ``"class"`` that is one as ``klass(queue.Queue(), ...)`` with a QueueListener of its own.
    """

    def __init__(self, directory: Union[str, "os.PathLike[str]"], name: str = "run", **options: Any) -> None:
        self.service = LogService(directory, name, **options).start()
        own = self.service._handler
        assert own is not None
        logging.getLogger().removeHandler(own)  # the config decides where this handler goes
        super().__init__(own.level)
        self._inner = own

    def handle(self, record: logging.LogRecord) -> Any:
        # Like MPQueueHandler.handle: no handler lock on the hot path.
        rv = self.filter(record) if self.filters else True
        if rv:
            self._inner.handle(rv if isinstance(rv, logging.LogRecord) else record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        self._inner.emit(record)
