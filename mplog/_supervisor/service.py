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
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .._app.capture import ENV as CAPTURE_ENV
from .._app.capture import capture_dir, disabled_by_env, publish, withdraw
from .._common.config import ListenerConfig, ServiceConfig, WorkerConfig
from .._common.counters import STATE_STOPPED, Counters
from .health import Health, down_report
from .._app.process import ExceptionHooks
from .._common.spool import (RING_HEADER, SPOOL_MAX_AGE_S, _process_start, clean_spools, list_spools, place_spool,
                     remove_spool, ring_capacity, spool_prefix, spool_roots, unwritten_records,
                     write_owner)
from .supervisor import Supervisor, write_health_file
from .._common.transport import K_FLUSH, K_NOTICE, K_REOPEN, K_STOP, FifoWriter
from .._app.handler import ServiceQueue, SpoolHandler, _service_read_fds, close_channel, uninstall, with_levels, worker_init

__all__ = ["LogService", "ServiceHandler"]


def private_directory(directory: Path) -> bool:
    """True if only its owner (this user, or root) can create or rename files in it: then a
    symbolic link at a log path was put there by this user, and is followed like a FileHandler
    would. In a directory others can write (group or world, like /tmp), a link may be planted
    to make the listener write somewhere else, so links are refused there."""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return st.st_uid in (os.getuid(), 0) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


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
            if not private_directory(directory):
                raise OSError(errno.ELOOP, "the log file is a symbolic link in a directory that others can write; "
                                           "refusing to follow it (it could have been planted)", str(path))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # a dangling link: the listener creates its target, as open() would
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "the log file exists and is not a regular file", str(path))
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "the log file is not writable", str(path))


_running: Dict[str, "LogService"] = {}  # file set -> the service this process runs for it


def _file_set_key(cfg: ServiceConfig) -> str:
    return spool_prefix(str(cfg.directory), cfg.name)


def lock_path(cfg: ServiceConfig) -> Path:
    """The file set's lock file: ``<directory>/.<name>.lock``."""
    return cfg.directory / f".{cfg.name}.lock"


def _lock_file_set(cfg: ServiceConfig) -> int:
    """Take the file set's lock, or raise OSError naming the files and the holder.

    The lock is a ``flock`` on ``.<name>.lock`` in the log directory, 0600, this user's: a file
    set is known by what it is (the same files through a symbolic link or a bind mount share
    one lock file; two filesystems mounted at one path in two mount namespaces have two), the
    kernel drops it when the holder dies, and no other user can open it to hold it. ``flock``
    belongs to the open file, not the process: a second service of this process on the same
    files is refused too. A forked child closes its copy (see _worker), so an orphaned worker
    never keeps the next run out. The file holds the holder's pid; stop() removes it.
    """
    path = lock_path(cfg)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
                raise PermissionError(errno.EPERM, f"the lock file of these log files belongs to uid {st.st_uid}, who "
                                                   "could hold it: remove it, or log to a directory only you can write",
                                      str(path))
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)  # nobody else may open it, even to read: flock needs no more
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                here = " (this process)" if holder == str(os.getpid()) else ""
                raise OSError(errno.EBUSY, f"another mplog service (pid {holder}{here}) is writing these log files; "
                                           "stop it, choose another name, or use mplog.ServiceHandler to join it",
                              str(cfg.simplified_path)) from None
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)  # its holder removed it as we opened it: take the new one
                continue
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _service_read_fds[fd] = os.getpid()  # a forked child closes it
        return fd


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").split()
    except OSError:
        return "?"
    return text[0] if text and text[0].isdigit() else "?"


def _join_children(deadline: float) -> None:
    import multiprocessing
    for child in multiprocessing.active_children():
        if not child.daemon:
            child.join(max(0.0, deadline - time.monotonic()))


def _pool_worker_kind(cmdline: List[str]) -> Optional[str]:
    for flag, value in zip(cmdline, cmdline[1:]):
        if flag == "-c" and value.lstrip().startswith("from multiprocessing.spawn import spawn_main"):
            return "multiprocessing spawn worker"
        if flag == "-m" and value.endswith("loky.backend.popen_loky_posix"):
            return "loky worker"
    return None


def _has_children() -> bool:
    """Whether this process has a child, without reaping one: the cheap question that spares
    psutil (1.0 MB in the main process, and so in every forked worker) when it has none."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    except (AttributeError, OSError):  # no waitid here: ask psutil
        pass
    return True


def _uncaptured_workers(capture_dir: str) -> List[Tuple[int, str]]:
    """This process's pool workers (spawn children, loky workers, at any depth) that were not
    started under a capture of this process: nothing routes their records to a service."""
    try:
        import psutil
        children = psutil.Process().children(recursive=True)
    except Exception:
        return []
    found = []
    for child in children:
        try:
            kind = _pool_worker_kind(child.cmdline())
            if kind is None:
                continue
            # The environment it was started with: a worker captured by an earlier service of
            # this process follows this one.
            if child.environ().get(CAPTURE_ENV, "").partition(":")[2] == capture_dir:
                continue
        except Exception:  # gone, or not ours to read
            continue
        found.append((child.pid, kind))
    return found


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
        given = dict(locals())
        for key in ("self", "directory", "name", "given"):
            given.pop(key, None)
        self.config = ServiceConfig.build(directory, name, **given)
        self._lock = threading.RLock()
        self._started = False
        self._stopped = False
        self._runtime: Optional[str] = None
        self._counters: Optional[Counters] = None
        self._supervisor: Optional[Supervisor] = None
        self._health: Optional[Health] = None
        self._handler: Optional[SpoolHandler] = None
        self._lock_fd = -1
        self._writer: Optional[FifoWriter] = None
        self._read_fd = -1
        self._ring_bytes = ring_capacity(self.config.queue_size)
        self._worker_config: Optional[WorkerConfig] = None
        self._final: Optional[Dict[str, Any]] = None
        self._saved_root: Optional[tuple] = None
        self._tokens = itertools.count(1)
        self._flush_lock = threading.Lock()
        self._saved_signals: list = []
        self._capture_dir: Optional[str] = None
        self._strays_possible = False
        self._hooks: Optional[ExceptionHooks] = None
        # The process that started it: the only one that stops it. In any other (a forked
        # child holds a copy of this object) stop() and close() detach that process only.
        self._owner_pid = 0
        self._diverted_flushed = 0  # records sent to stderr that an earlier flush() reported
        self._exit_marker: Optional[logging.Handler] = None  # see _stop_with_logging_shutdown

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
            placement = place_spool(RING_HEADER + self._ring_bytes)
            mine = _running.get(prefix)
            if mine is not None and mine._owned() and not mine._stopped:  # the same path in this process: say so
                raise OSError(errno.EBUSY, f"another mplog service (pid {os.getpid()}, this process) is writing "
                                           "these log files; stop it, or use mplog.ServiceHandler to share it",
                              str(cfg.simplified_path))
            self._lock_fd = _lock_file_set(cfg)  # one writer per file set
            for place in spool_roots():
                clean_spools(SPOOL_MAX_AGE_S, place)  # abandoned spools of any run of this user
            # Spools of earlier runs of this file set that died with records unwritten (in any
            # root: an earlier run may have found other room).
            leftovers = tuple(s.path for s in list_spools(None, prefix) if not s.alive and s.unwritten)
            root = placement.root
            # Made under a name no other service looks at, then renamed once it has its owner
            # file: a concurrent start's cleaning must never take it for an orphan.
            staging = tempfile.mkdtemp(prefix="." + prefix, dir=root)
            write_owner(staging, str(cfg.directory), cfg.name)
            self._runtime = os.path.join(root, os.path.basename(staging)[1:])
            os.rename(staging, self._runtime)
            try:
                self._start_in(self._runtime, leftovers)
            except BaseException:
                self._cleanup()
                self._unlock()
                raise
            self._started = True
            self._owner_pid = os.getpid()
            if placement.notice:
                self._notice(placement.notice)
            _running[_file_set_key(cfg)] = self
            atexit.register(self._at_exit)
            return self

    def _owned(self) -> bool:
        """True in the process that started this service (not in a forked copy of it)."""
        return self._owner_pid == os.getpid()

    def _joinable(self) -> Optional[WorkerConfig]:
        """In a forked child of the service's process: the service's WorkerConfig while it runs
        (its counters say so), for a ServiceHandler of the same file set to join it."""
        cfg = self._worker_config
        if cfg is None or not self._started or self._owned():
            return None
        try:
            counters = Counters.open(cfg.counters_path)
        except OSError:
            return None  # the spool is gone: the service has stopped
        try:
            return cfg if counters.get("state") != STATE_STOPPED else None
        finally:
            counters.close()

    def _start_in(self, runtime: str, leftovers: Tuple[str, ...]) -> None:
        cfg = self.config
        # Pool workers started before the service are children already; asked before the
        # listener, our own child, is one.
        self._strays_possible = self._will_capture() and _has_children()
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
            service_id=os.urandom(16).hex(),  # uuid4's randomness without uuid's libuuid in every fork
            simplified_level=cfg.simplified_level, queue_size=cfg.queue_size, ring_bytes=self._ring_bytes,
            owner_pid=os.getpid(), capture_output=cfg.capture_output,
            lean=cfg.simplified_format is None and cfg.full_format is None)
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
            recover=leftovers, follow_symlinks=private_directory(cfg.directory),
            capture_dir=self._capture_path())
        self._health = Health(cfg, self._counters, runtime, self._ring_bytes)
        self._supervisor = Supervisor(cfg, self._counters, listener, self._health)
        self._supervisor.start()
        self._writer = FifoWriter(fifo)
        # A ServiceHandler in another process of the application (dictConfig at module level
        # under spawn) joins this service through this file.
        with open(os.path.join(runtime, "worker.json"), "w") as f:
            f.write(self._worker_config.to_json())
        # The main process logs through the service too, at ``level``. The user's own root
        # handlers keep printing what they printed: one that had no level of its own relied on
        # the root's, and gets it as its own until stop() gives everything back.
        root = logging.getLogger()
        pinned = []
        for h in root.handlers:
            if h.level == logging.NOTSET and root.level > cfg.level:
                h.setLevel(root.level)
                pinned.append(h)
        already_captured = getattr(logging, "_warnings_showwarning", None) is not None
        self._saved_root = (pinned, root.level, cfg.capture_warnings and not already_captured)
        self._handler = SpoolHandler(self._worker_config)
        self._handler.flush_hook = self._flush_for_handler
        self._handler.channel._attach()
        root.addHandler(self._handler)
        root.setLevel(min(cfg.level, root.level) if root.level else cfg.level)
        if cfg.capture_warnings:
            logging.captureWarnings(True)
        # Uncaught exceptions of the main process and its threads are logged, then printed.
        self._hooks = ExceptionHooks(bootstrap=False)
        self._supervisor.write_health_file()
        if self._will_capture():
            self._capture_children()

    # -- pool workers made without the initializer (issue 13; see _capture.py) ----------------
    def _capture_path(self) -> Optional[str]:
        if not self._will_capture():
            return None
        try:
            return capture_dir()
        except OSError:
            return None  # publish() says why, as a notice

    def _will_capture(self) -> bool:
        return self.config.capture_children and not disabled_by_env()

    def _capture_children(self) -> None:
        assert self._worker_config is not None
        try:
            self._capture_dir = publish(self._worker_config)
        except OSError as exc:
            self._notice(f"pool workers made without mplog's initializer will not log here: the capture "
                         f"directory cannot be written ({exc})")
            return
        strays = _uncaptured_workers(self._capture_dir) if self._strays_possible else []
        if strays:
            shown = ", ".join(f"{pid} ({kind})" for pid, kind in strays[:10])
            more = f" and {len(strays) - 10} more" if len(strays) > 10 else ""
            self._notice(f"{len(strays)} pool worker process(es) started before this service cannot log to it: "
                         f"{shown}{more}. Their records go where logging sends them without mplog. Start the "
                         f"pool after the service, or pass svc.pool_kwargs() (joblib: call "
                         f"get_reusable_executor().shutdown() from joblib.externals.loky first)")

    def _notice(self, text: str) -> None:
        self._send_control(K_NOTICE, text.encode("utf-8", "backslashreplace"), time.monotonic() + 1.0)

    def _withdraw_capture(self) -> None:
        if self._capture_dir is not None and self._worker_config is not None:
            withdraw(self._worker_config.service_id)
            self._capture_dir = None

    def _send_control(self, kind: int, payload: bytes, deadline: Optional[float]) -> bool:
        writer = self._writer
        if writer is None:
            return False
        try:
            return writer.write_frames(kind, payload, deadline)
        except OSError:
            return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Return True once every record logged before this call is in the files; False if that
        did not happen within ``timeout`` seconds, or if records went to stderr instead of the
        files since the previous flush() (each such episode is reported once)."""
        with self._lock:
            if self._started and not self._owned():
                # A forked copy: this process's own records only (its ring's tail).
                return self._handler is None or self._handler.channel.wait_written(timeout)
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
            flushed = supervisor.wait_flushed(token, deadline, send)
            return self._nothing_diverted() and flushed

    def _nothing_diverted(self) -> bool:
        """False if records went to stderr instead of the files since the last call (a stopped
        or missing spool, a listener that could not write): flush() must not say "written"."""
        if self._health is None:
            return True
        diverted = self._health.diverted()
        if diverted > self._diverted_flushed:
            self._diverted_flushed = diverted
            return False
        return True

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
        state, and returns the final health report.

        In a process that did not start the service (a forked child, where ``dictConfig``
        closes the inherited handlers) it only detaches that process: see ``_detach``."""
        return self._stop(restore=True)

    def _stop(self, restore: bool) -> Dict[str, Any]:
        with self._lock:
            if self._started and not self._owned():
                return self._detach()
            if self._stopped or not self._started:
                return self.health()
            self._stopped = True
            deadline = time.monotonic() + self.config.shutdown_timeout
            self._withdraw_capture()  # first: no new child joins a service that is stopping
            if restore:
                self._restore_root()
            elif self._hooks is not None:
                # At exit, our handler stays on the root: a record logged later (a handler's
                # close, an atexit function registered before logging was imported) finds the
                # service stopped and goes to stderr as one simplified line.
                self._hooks.uninstall()
                self._hooks = None
            self._restore_signals()
            atexit.unregister(self._at_exit)

            supervisor = self._supervisor
            if supervisor is not None:
                channel = self._handler.channel if self._handler is not None else None
                # No record of this process in flight while the listener takes its last look:
                # then it need not wait for any (``quiet``), unless other processes log.
                with channel.quiesced(0.5) if channel is not None else contextlib.nullcontext(True) as quiet:

                    def send_stop(budget: float, dl: float) -> bool:
                        return self._send_control(K_STOP, struct.pack("<dB", budget, bool(quiet)), dl)

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
            self._unlock()
            _running.pop(_file_set_key(self.config), None)
            return self._final

    def _detach(self) -> Dict[str, Any]:
        """This process stops logging through the service's main-process handler; the owner's
        listener, spool, files, capture and lock are not this process's to touch. Records this
        process logs go where its configuration now sends them."""
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        atexit.unregister(self._at_exit)
        return {"status": "detached", "service": {"pid": self._owner_pid, "name": self.config.name,
                                                  "directory": str(self.config.directory)}}

    def _restore_root(self) -> None:
        if self._hooks is not None:
            self._hooks.uninstall()
            self._hooks = None
        root = logging.getLogger()
        if self._handler is not None:
            uninstall(self._handler)
            root.removeHandler(self._handler)
        if self._saved_root is not None:
            pinned, level, captured = self._saved_root
            root.setLevel(level)
            for h in pinned:
                h.setLevel(logging.NOTSET)
            if captured:  # only if we turned it on: the user's own captureWarnings(True) stays
                logging.captureWarnings(False)
            self._saved_root = None

    def _flush_for_handler(self, timeout: float) -> None:
        if self._started and not self._stopped:
            self.flush(timeout)  # in a forked copy, this process's own records (see flush)

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            _service_read_fds.pop(self._lock_fd, None)
            try:
                # Removed while held (a service waiting for it sees another inode and retries).
                path = lock_path(self.config)
                if (os.lstat(path).st_ino, os.lstat(path).st_dev) == (os.fstat(self._lock_fd).st_ino,
                                                                      os.fstat(self._lock_fd).st_dev):
                    os.unlink(path)
            except OSError:
                pass
            try:
                os.close(self._lock_fd)  # releases the lock
            except OSError:
                pass
            self._lock_fd = -1

    def _cleanup(self) -> None:
        self._withdraw_capture()
        if self._worker_config is not None:
            close_channel(self._worker_config)  # this process's ring, its counters, its doorbell
        if self._counters is not None:
            # The supervisor and health read them no more: the final report is taken.
            self._counters.close()
            self._counters = None
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
        # atexit runs last-registered-first, and logging registered its shutdown() when it was
        # imported, before any service: the standard library's handlers still write what every
        # atexit function logs. Stopping here would lose what the functions registered before
        # start() log. So here (before multiprocessing's exit function, registered earlier,
        # terminates daemonic children) wait for non-daemon children, bounded, as Python would
        # after us; then leave the stop to logging.shutdown(), through a handler it closes last.
        if self._started and not self._owned():
            return  # a forked child's exit (3.13+ runs atexit there): not this process's service
        try:
            _join_children(time.monotonic() + self.config.exit_timeout)
        except Exception:
            pass
        if not _stop_with_logging_shutdown(self):
            self._stop_at_exit()

    def _stop_at_exit(self) -> None:
        try:
            self._stop(restore=False)
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

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self._started else "new")
        return f"<LogService {self.config.directory}/{self.config.name} {state}>"




class _StopAtShutdown(logging.Handler):
    """Not a handler of any logger: a place in ``logging._handlerList``, first, so that the
    ``logging.shutdown()`` that runs at exit closes it after every other handler, once every
    atexit function has run. Closing it stops the service."""

    def __init__(self, service: LogService) -> None:
        super().__init__()
        self.service: Optional[LogService] = service

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - on no logger
        pass

    def close(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            service._stop_at_exit()
        super().close()


def _stop_with_logging_shutdown(service: LogService) -> bool:
    """Have logging's own exit-time shutdown stop ``service`` last (see LogService._at_exit).
    False where logging keeps no such list (then the caller stops now)."""
    import weakref
    handlers = getattr(logging, "_handlerList", None)
    if not isinstance(handlers, list):
        return False
    marker = _StopAtShutdown(service)  # appends a weak reference to itself: move it to the front
    service._exit_marker = marker  # logging's list holds a weak reference only
    lock = getattr(logging, "_lock", None)  # logging's module lock (3.6+), around its list
    with lock if lock is not None else contextlib.nullcontext():
        for i, ref in enumerate(handlers):
            if ref() is marker:
                del handlers[i]
                break
        handlers.insert(0, weakref.ref(marker))
    return True


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
        self._key = _file_set_key(config)
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
                    raise OSError(errno.EBUSY, f"{exc.strerror.partition(';')[0]}, and it is not a service of "
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
