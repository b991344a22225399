"""``LogService``: what the application holds. Owns the spool, the supervisor, the main
process's handler, and the exit hook.

The spool is a directory ``mplog-<uid>-<key>-<random>`` on tmpfs (``XDG_RUNTIME_DIR`` or
``/dev/shm``), 0700, where ``key`` names the file set (directory and name): the counters, the
control FIFO, one ring per process, and an ``owner`` file (pid and start time of the main
process). A normal stop removes it; so does the listener when the application dies without
stopping. A spool that still holds unwritten records (everything was SIGKILLed) is kept, and
the next ``LogService`` on the same file set writes those records first.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import logging
import os
import stat
import struct
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from ._config import ListenerConfig, ServiceConfig, WorkerConfig
from ._counters import Counters
from ._health import Health, down_report
from ._process import ExceptionHooks
from ._spool import (SPOOL_MAX_AGE_S, clean_spools, list_spools, remove_spool, ring_capacity, spool_prefix,
                     spool_root, unwritten_records, write_owner)
from ._supervisor import Supervisor, write_health_file
from ._transport import K_FLUSH, K_REOPEN, K_STOP, FifoWriter
from ._worker import MPQueueHandler, _service_read_fds, uninstall, worker_init

__all__ = ["LogService", "ServiceHandler"]


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
        self._health: Optional[Health] = None
        self._handler: Optional[MPQueueHandler] = None
        self._writer: Optional[FifoWriter] = None
        self._read_fd = -1
        self._ring_bytes = ring_capacity(self.config.queue_size)
        self._worker_config: Optional[WorkerConfig] = None
        self._final: Optional[Dict[str, Any]] = None
        self._saved_root: Optional[tuple] = None
        self._tokens = itertools.count(1)
        self._flush_lock = threading.Lock()
        self._ps_main: Any = None
        self._saved_signals: list = []
        self._hooks: Optional[ExceptionHooks] = None

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
            prefix = spool_prefix(str(cfg.directory), cfg.name)
            root = spool_root()
            clean_spools(SPOOL_MAX_AGE_S, root)  # abandoned spools of any run of this user
            # Spools of earlier runs of this file set that died with records unwritten.
            leftovers = tuple(s.path for s in list_spools(root, prefix) if not s.alive and s.unwritten)
            self._runtime = tempfile.mkdtemp(prefix=prefix, dir=root)
            try:
                write_owner(self._runtime, str(cfg.directory), cfg.name)
                self._start_in(self._runtime, leftovers)
            except BaseException:
                self._cleanup()
                raise
            self._started = True
            atexit.register(self._at_exit)
            return self

    def _start_in(self, runtime: str, leftovers: Tuple[str, ...]) -> None:
        cfg = self.config
        fifo = os.path.join(runtime, "fifo")
        counters_path = os.path.join(runtime, "counters")
        os.mkfifo(fifo, 0o600)
        self._counters = Counters.create(counters_path)
        # The main process holds a read end for the service's whole life, so writers can always
        # open the FIFO (control frames, the doorbell) while a killed listener is replaced.
        self._read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        _service_read_fds[self._read_fd] = os.getpid()
        self._worker_config = WorkerConfig(
            fifo_path=fifo, counters_path=counters_path, level=cfg.level, overflow=cfg.overflow,
            overflow_timeout=cfg.overflow_timeout, capture_warnings=cfg.capture_warnings,
            service_id=uuid.uuid4().hex,
            # Custom formats and syslog need the record's fields in the listener.
            preformat=cfg.simplified_format is None and cfg.full_format is None and cfg.syslog is None,
            simplified_level=cfg.simplified_level, queue_size=cfg.queue_size, ring_bytes=self._ring_bytes,
            owner_pid=os.getpid(), capture_output=cfg.capture_output)
        colour = (cfg.console is not None and sys.stderr is not None and sys.stderr.isatty()
                  and not os.environ.get("NO_COLOR"))
        listener = ListenerConfig(
            fifo_path=fifo, counters_path=counters_path, runtime_dir=runtime,
            simplified_path=str(cfg.simplified_path), full_path=str(cfg.full_path),
            level=cfg.level, simplified_level=cfg.simplified_level,
            flush_count=cfg.flush_count, flush_interval=cfg.flush_interval, shutdown_timeout=cfg.shutdown_timeout,
            console=cfg.console, console_colour=bool(colour),
            simplified_format=cfg.simplified_format, full_format=cfg.full_format, datefmt=cfg.datefmt,
            file_mode=cfg.file_mode, rotate_bytes=cfg.rotate_bytes, rotate_interval=cfg.rotate_interval,
            backup_count=cfg.backup_count, compress=cfg.compress, syslog=cfg.syslog, syslog_level=cfg.syslog_level,
            recover=leftovers)
        try:
            import psutil
            self._ps_main = psutil.Process()
        except Exception:
            self._ps_main = None
        self._health = Health(cfg, self._counters, runtime, self._ring_bytes, self._main_create_time())
        self._supervisor = Supervisor(cfg, self._counters, listener, self._health)
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
        # Uncaught exceptions of the main process and its threads are logged, then printed.
        self._hooks = ExceptionHooks(bootstrap=False)
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
            if self._health is not None and supervisor is not None:
                self._final = self._health.report(supervisor, final=True)
            else:
                self._final = down_report(self.config)
            try:
                # A probe must read "down" now, not the last running report.
                write_health_file(self.health_path, self._final)
            except OSError:
                pass
            self._cleanup()
            return self._final

    def _restore_root(self) -> None:
        if self._hooks is not None:
            self._hooks.uninstall()
            self._hooks = None
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
            # A spool that still holds records (a listener that could not drain in time) is
            # kept for the next run on this file set; anything else goes.
            if not unwritten_records(self._runtime):
                remove_spool(self._runtime)
            elif self._final is not None:
                self._final["spool_kept"] = self._runtime
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
        if self._supervisor is None or self._health is None:
            return down_report(self.config)
        return self._health.report(self._supervisor)

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
