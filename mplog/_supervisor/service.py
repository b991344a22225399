"""``LogService``: what the application holds; ``ServiceHandler``: the same service declared in
a logging configuration.

``LogService`` is the façade: its options, its state (new, running, stopped; in the process
that started it or in a forked copy, which only detaches), and its public methods. The jobs
it runs are classes of their own, each in a module of this room:

* ``fileset``: the log directory checked, and ``FileSetLock``, one writer per file set;
* ``spooldir``: ``SpoolDirectory``, the spool made, its leftovers found, removed or kept;
* ``run``: ``ServiceRun``, what one start() builds and its stop() takes down, in order, and
  the flush barrier;
* ``supervisor`` and ``health``: the listener started, watched, restarted, reported on;
* ``mainlog``: ``RootLogging``, the main process's own records through the service;
* ``children``: ``ChildCapture``, pool workers made without mplog's initializer;
* ``ending``: ``ExitHook`` (a stop at interpreter exit, last) and ``StopSignals``.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple, Union

from .._app.handler import ServiceQueue, SpoolHandler, with_levels, worker_init
from .._common.config import ServiceConfig, WorkerConfig
from .._common.spool import _process_start, list_spools
from .._common.transport import K_REOPEN
from .ending import ExitHook, StopSignals
from .fileset import FileSetLock, file_set_key, lock_path, private_directory
from .health import down_report
from .run import ServiceRun

__all__ = ["LogService", "ServiceHandler", "lock_path", "private_directory"]

_running: Dict[str, "LogService"] = {}  # file set -> the service this process runs for it


class LogService:
    """One listener process writing ``<directory>/<name>.log`` and ``<name>.debug.log`` for every
    process of the application. See the README for every option."""

    def __init__(
        self,
        directory: Union[str, "os.PathLike[str]"],
        name: str = "run",
        *,
        level: Union[int, str] = logging.DEBUG,
        simplified_level: Union[int, str] = logging.INFO,
        queue_size: int = 10000,
        overflow: str = "block",
        overflow_timeout: float = 0.01,
        flush_interval: float = 1.0,
        flush_count: int = 1000,
        shutdown_timeout: float = 5.0,
        exit_timeout: float = 60.0,
        capture_warnings: bool = True,
        capture_children: bool = True,
        capture_output: bool = False,
        console: Optional[Union[int, str]] = None,
        restart_backoff_initial: float = 0.1,
        restart_backoff_max: float = 5.0,
        degraded_restarts: int = 5,
        degraded_window: float = 60.0,
        health_interval: float = 1.0,
        simplified_format: Optional[str] = None,
        full_format: Optional[str] = None,
        datefmt: Optional[str] = None,
        file_mode: Optional[int] = None,
        rotate_bytes: Optional[int] = None,
        rotate_interval: Optional[Union[float, str]] = None,
        backup_count: int = 5,
        compress: bool = False,
        syslog: Optional[Union[str, Tuple[str, int]]] = None,
        syslog_level: Union[int, str] = logging.DEBUG,
    ) -> None:
        """Configure a service; nothing starts until ``start()`` (or ``with``).

        :param directory: where the logs go; created if missing (``OSError`` naming it at start).
        :param name: the files' stem: ``<name>.log``, ``<name>.debug.log``, ``<name>.health.json``.
        :param level: the full log's threshold; records below it are not captured at all.
        :param simplified_level: the simplified log's threshold (user messages go there too).
        :param queue_size: records each process's ring in the spool holds.
        :param overflow: a full ring: ``"block"``, ``"drop"``, ``"timeout"`` or ``"stderr"``.
        :param overflow_timeout: seconds ``"timeout"`` waits, once per overflow episode.
        :param flush_interval: the longest a record waits in the listener before it is written.
        :param flush_count: records per batch written, at most (one ``write()`` per file per batch; size
            rotation is checked after each batch).
        :param shutdown_timeout: ``stop()`` returns within this (+0.5 s), whatever the listener does.
        :param exit_timeout: at exit, how long to wait for non-daemon children before stopping.
        :param capture_warnings: route ``warnings`` into logging, in every process.
        :param capture_children: while it runs, pools made without the initializer (joblib, Dask,
            spawn and forkserver pools) log here too (README: joblib, scikit-learn and Dask).
        :param capture_output: each worker's stdout and stderr lines become records (loggers
            ``stdout`` at INFO, ``stderr`` at WARNING); off by default.
        :param console: a level: also echo simplified lines at or above it to stderr.
        :param restart_backoff_initial: the first delay before restarting a crash-looping listener.
        :param restart_backoff_max: the longest such delay.
        :param degraded_restarts: crash-loop restarts within ``degraded_window`` that mean degraded.
        :param degraded_window: seconds.
        :param health_interval: how often ``<name>.health.json`` is refreshed.
        :param simplified_format: a ``%``-style format string for the simplified log.
        :param full_format: a ``%``-style format string for the full log, or ``"jsonl"``.
        :param datefmt: ``datefmt`` for those format strings.
        :param file_mode: permission bits for new log files (default: the umask applies).
        :param rotate_bytes: rotate a file when it reaches this size.
        :param rotate_interval: rotate a file this many seconds after it was opened.
        :param backup_count: rotated copies kept per file.
        :param compress: gzip rotated copies.
        :param syslog: ``"host:port"`` or ``(host, port)``: also forward records over TCP.
        :param syslog_level: the lowest level forwarded to syslog.

        A bad value raises ``ValueError`` naming the option (and both options of a bad pair).
        """
        # (the comprehension's first iterable is evaluated here, in __init__'s scope)
        given = {k: v for k, v in dict(locals()).items() if k not in ("self", "directory", "name")}
        self.config = ServiceConfig.build(directory, name, **given)
        self._lock = threading.RLock()
        self._started = False
        self._stopped = False
        self._file_lock = FileSetLock(self.config)
        self._run: Optional[ServiceRun] = None
        self._final: Optional[Dict[str, Any]] = None
        self._signals = StopSignals()
        self._exit = ExitHook(self._stop_at_exit, self._foreign, self.config.exit_timeout)
        # The process that started it: the only one that stops it. In any other (a forked
        # child holds a copy of this object) stop() and close() detach that process only.
        self._owner_pid = 0

    # -- paths and configs -----------------------------------------------------------------
    simplified_path = property(lambda self: self.config.simplified_path, doc="``<directory>/<name>.log``")
    full_path = property(lambda self: self.config.full_path, doc="``<directory>/<name>.debug.log``")
    health_path = property(lambda self: self.config.health_path, doc="``<directory>/<name>.health.json``")

    @property
    def worker_config(self) -> WorkerConfig:
        """What a process needs to log here (``mplog.worker_init(config)``). It carries the
        levels of the named loggers of this process as they are when you read it."""
        if self._worker_config is None:
            raise RuntimeError("the service is not started: call start() or use it as a context manager")
        return with_levels(self._worker_config)

    def pool_kwargs(self) -> Dict[str, Any]:
        """``initializer``/``initargs`` for ProcessPoolExecutor and multiprocessing.Pool. The
        workers get the logger levels this process has when you call it."""
        return {"initializer": worker_init, "initargs": (self.worker_config,)}

    @property
    def queue(self) -> ServiceQueue:
        """A queue for code that wants one: ``QueueHandler(svc.queue)``, dictConfig's
        ``"queue"``. It pickles into children under every start method."""
        if self._worker_config is None:
            raise RuntimeError("the service is not started")
        return ServiceQueue(self._worker_config)

    # The parts of the run that a ServiceHandler and this façade read.
    @property
    def _worker_config(self) -> Optional[WorkerConfig]:
        return self._run.worker if self._run is not None else None

    @property
    def _handler(self) -> Optional[SpoolHandler]:
        return self._run.root.handler if self._run is not None else None

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
            mine = _running.get(file_set_key(cfg))
            if mine is not None and mine._owned() and not mine._stopped:  # the same path in this process: say so
                raise OSError(errno.EBUSY, f"another mplog service (pid {os.getpid()}, this process) is writing "
                                           "these log files; stop it, or use mplog.ServiceHandler to share it",
                              str(cfg.simplified_path))
            self._run = ServiceRun.launch(cfg, self._file_lock, self.flush)
            self._started = True
            self._owner_pid = os.getpid()
            _running[file_set_key(cfg)] = self
            self._exit.register()
            return self

    def _owned(self) -> bool:
        """True in the process that started this service (not in a forked copy of it)."""
        return self._owner_pid == os.getpid()

    def _foreign(self) -> bool:
        """True in a forked copy of a started service: nothing of it is this process's to stop."""
        return self._started and not self._owned()

    def _joinable(self) -> Optional[WorkerConfig]:
        """In a forked child of the service's process: the service's WorkerConfig while it runs,
        for a ServiceHandler of the same file set to join it."""
        return self._run.live_worker() if self._foreign() and self._run is not None else None

    # -- barriers and requests ---------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Return True once every record logged before this call is in the files; False if that
        did not happen within ``timeout`` seconds, or if records went to stderr instead of the
        files since the previous flush() (each such episode is reported once)."""
        if self._stopped:  # without the lock: a handler's flush() while stop() runs returns at once
            return True
        with self._lock:
            if self._foreign():
                # A forked copy: this process's own records only (its ring's tail).
                return self._handler is None or self._handler.channel.wait_written(timeout)
            run = self._run
            if not self._started or self._stopped or run is None or run.supervisor is None:
                return self._stopped
        return run.flush(timeout)

    def install_signal_handlers(self, signals: Any = None) -> None:
        """Opt in: on SIGTERM or SIGINT, stop the service (every record logged before the signal
        is written), then let the signal do what it did before: SIGINT raises KeyboardInterrupt,
        SIGTERM ends the process with the usual status. A library takes no signal by default;
        call this from the main thread. ``stop()`` puts the previous handlers back."""
        self._signals.install(self.stop, signals)

    def reopen(self) -> None:
        """Ask the listener to reopen the log files (after an external logrotate)."""
        if self._run is not None:
            self._run.send(K_REOPEN, b"", time.monotonic() + 1.0)

    # -- stopping ----------------------------------------------------------------------------
    def stop(self) -> Dict[str, Any]:
        """Write every record logged before this call, stop the listener, restore the root
        logger. Idempotent. Returns within ``shutdown_timeout`` (+0.5 s) whatever the listener's
        state, and returns the final health report.

        In a process that did not start the service (a forked child, where ``dictConfig``
        closes the inherited handlers) it only detaches that process: see ``_detach``."""
        return self._stop(restore=True)

    def _stop(self, restore: bool) -> Dict[str, Any]:
        with self._lock:
            if self._foreign():
                return self._detach()
            run = self._run
            if self._stopped or not self._started or run is None:
                return self.health()
            self._stopped = True
            deadline = time.monotonic() + self.config.shutdown_timeout
            run.stop_taking(restore)  # first: no new child joins a service that is stopping
            self._signals.restore()
            self._exit.unregister()
            run.stop_listener(deadline)
            self._final = run.final_report()
            run.close(self._final)
            self._file_lock.release()
            _running.pop(file_set_key(self.config), None)
            return self._final

    def _detach(self) -> Dict[str, Any]:
        """This process stops logging through the service's main-process handler; the owner's
        listener, spool, files, capture and lock are not this process's to touch. Records this
        process logs go where its configuration now sends them."""
        if self._run is not None:
            self._run.root.detach()
        self._exit.unregister()
        return {"status": "detached", "service": {"pid": self._owner_pid, "name": self.config.name,
                                                  "directory": str(self.config.directory)}}

    def _stop_at_exit(self) -> None:
        """The stop of ExitHook: the root logger keeps our handler (see ServiceRun.stop_taking)."""
        self._stop(restore=False)

    # -- health ------------------------------------------------------------------------------
    def health(self) -> Dict[str, Any]:
        """A JSON-serialisable report: status, listener, restarts, queue, records, files."""
        if self._final is not None:
            return dict(self._final)
        run = self._run
        if run is None or run.supervisor is None or run.health is None:
            return down_report(self.config)
        return run.health.report(run.supervisor)

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self._started else "new")
        return f"<LogService {self.config.directory}/{self.config.name} {state}>"


_shares: Dict[str, int] = {}  # file set -> ServiceHandlers of this process sharing its service


class ServiceHandler(logging.Handler):
    """A handler that runs (or joins) the ``LogService`` of its file set: the way to declare
    mplog in ``logging.config.dictConfig`` (or YAML), or ``fileConfig`` INI files::

        "handlers": {"mplog": {"class": "mplog.ServiceHandler", "directory": "logs",
                               "name": "run", "simplified_level": "INFO"}}

    Every keyword is a ``LogService`` option. One file set has one service:

    * a second ServiceHandler for the same directory and name in this process (the
      configuration applied twice) shares the first one's service;
    * in another process of the application whose service already runs -- a child of the
      service's process at any depth: a fork child or a pool worker that applies the same
      LOGGING dict (Django, Celery prefork, gunicorn), a spawn child that re-imports a
      ``__main__`` configuring logging at module level -- it *joins* that service, starting
      nothing: ``handler.service`` is then ``None`` and ``handler.joined`` True;
    * a file set held by a service of another program raises ``OSError(EBUSY)`` naming it.

    ``close()`` (``logging.shutdown()`` calls it at exit) releases the service; the last
    handler of the service's own process to close stops it. Closed in any other process (a
    forked child's ``dictConfig`` closes what it inherited), it detaches that process only. ``flush()`` returns once every record logged
    before it is in the files. ``handler.service`` gives ``pool_kwargs()`` for the pools.

    Not a ``QueueHandler`` subclass on purpose: since Python 3.12, dictConfig builds every
    ``"class"`` that is one as ``klass(queue.Queue(), ...)`` with a QueueListener of its own.
    """

    def __init__(self, directory: Union[str, "os.PathLike[str]"], name: str = "run", **options: Any) -> None:
        self.service: Optional[LogService] = None
        self.joined = False
        self._closed = False
        config = ServiceConfig.build(directory, name, **options)
        self._key = file_set_key(config)
        running = _running.get(self._key)
        # A forked child holds a copy of its parent's service: it joins the original.
        worker = running._joinable() if running is not None else None
        if worker is not None:
            self.joined = True
            inner = SpoolHandler(worker)
        elif running is not None and running._owned() and not running._stopped:
            self.service = running
        else:
            try:
                self.service = LogService(directory, name, **options).start()
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                worker = _running_worker_config(self._key)
                if worker is None:
                    raise OSError(errno.EBUSY, f"{(exc.strerror or '').partition(';')[0]}, and it is not a service of "
                                               "this program (this process or one it was started from); stop "
                                               "it, or give this program another directory or name",
                                  exc.filename) from None
                self.joined = True
                inner = SpoolHandler(worker)
        if self.service is not None:
            _shares[self._key] = _shares.get(self._key, 0) + 1
            own = self.service._handler
            assert own is not None
            logging.getLogger().removeHandler(own)  # the config decides where this handler goes
            inner = own
        super().__init__(inner.level)
        self._inner = inner

    def handle(self, record: logging.LogRecord) -> Any:
        # Like SpoolHandler.handle: no handler lock on the hot path.
        rv = self.filter(record) if self.filters else True
        if rv:
            self._inner.handle(rv if isinstance(rv, logging.LogRecord) else record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        self._inner.emit(record)

    def setFormatter(self, fmt: Optional[logging.Formatter]) -> None:
        super().setFormatter(fmt)
        self._inner.setFormatter(fmt)  # it renders the message text (see SpoolHandler)

    def flush(self) -> None:
        self._inner.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            service = self.service
            if service is not None:
                left = _shares.get(self._key, 1) - 1
                _shares[self._key] = left
                if left <= 0:
                    _shares.pop(self._key, None)
                    service.stop()
        super().close()


def _ancestors() -> List[Tuple[int, int]]:
    """(pid, start time) of this process's parent, its parent, ... up to init (Linux's /proc;
    elsewhere the parent alone, start time unknown: 0)."""
    found: List[Tuple[int, int]] = []
    pid = os.getpid()
    while pid > 1 and len(found) < 64:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            if not found:
                found.append((os.getppid(), 0))
            break
        if ppid <= 0:
            break
        found.append((ppid, _process_start(ppid)))
        pid = ppid
    return found


def _running_worker_config(prefix: str) -> Optional[WorkerConfig]:
    """The worker config of the live service of a file set, run by a process this one was
    started from (at any depth: a pool worker of a pool worker). A service of another program
    is not joined: its files are its own."""
    ancestors = _ancestors()
    for spool in list_spools(None, prefix):  # wherever its room placed it
        if not spool.alive:
            continue
        if not any(pid == spool.owner_pid and (not start or not spool.owner_start or start == spool.owner_start)
                   for pid, start in ancestors):
            continue
        try:
            with open(os.path.join(spool.path, "worker.json")) as f:
                return WorkerConfig.from_json(f.read())
        except (OSError, ValueError, TypeError):
            continue
    return None
