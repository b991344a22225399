"""The worker side: a ``QueueHandler`` that publishes records into this process's ring.

Every process that logs (workers, the main process, plain ``Process`` children, nested pools)
runs only this module's code per record: flatten (and, with the default formats, format) the
record in the calling thread, then copy it into the process's own ring in the service's spool
(``_spool.RingWriter``): a memory copy, no system call, no lock shared with another process.
The record is in the spool, which outlives this process and the listener, when the logging call
returns; memory is bounded by the ring. When the listener sleeps (every ring was empty), one
byte-sized frame on the FIFO wakes it. Logging never raises into the caller: failures become
placeholders, drops and stderr lines, each counted in this process's slot of the shared counters.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import logging.handlers
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ._config import WorkerConfig
from ._counters import FIELDS, S_DIVERTED, S_DROPPED, S_ERRORS, S_REPLACED, S_RING, S_SENT, STATE_STOPPED, Counters, Slot
from . import _process
from ._format import Preformatter
from ._record import TEXT_VERSION, _make, deserialize, flatten, sanitize, serialize
from ._spool import RingWriter, _process_start, ring_capacity
from ._transport import K_WAKE, FifoWriter

__all__ = ["MPQueueHandler", "Channel", "worker_init", "install", "uninstall", "context",
           "current_config", "pool_kwargs"]

_SLEEPING = FIELDS.index("sleeping")

_context: contextvars.ContextVar[Optional[Dict[str, Any]]] = contextvars.ContextVar("mplog_context", default=None)


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[Dict[str, Any]]:
    """Add ``fields`` to the Context of every record logged inside the block (this thread or
    task; nested blocks merge, inner keys win)."""
    merged = dict(_context.get() or {})
    merged.update(fields)
    token = _context.set(merged)
    try:
        yield merged
    finally:
        _context.reset(token)


class Channel:
    """This process's connection to one service: its ring in the spool, its counter slot, the
    overflow policy.

    Quacks like a queue for the standard library: ``QueueHandler(svc.queue)`` works, because
    ``put_nowait`` accepts a LogRecord.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        # The slot's lock is re-entrant: a signal handler that logs while this thread is inside
        # put_payload must not deadlock; it finds ``_busy`` set and defers its record.
        self._busy = False
        self._deferred: List[Tuple[bytes, int]] = []
        self._pid = -1
        self._counters: Optional[Counters] = None
        self._slot: Optional[Slot] = None
        self._ring: Optional[RingWriter] = None
        self._doorbell: Optional[FifoWriter] = None
        self._overflowing = False  # overflow="timeout": the one wait of this episode is spent
        self._drops_unreported = 0
        self._last_notice = 0.0
        self._pre = Preformatter(config.simplified_level) if config.preformat else None

    def prepare(self, record: logging.LogRecord) -> Tuple[bytes, int]:
        """The record as a payload: formatted here (default formats) or flattened fields."""
        pre = self._pre
        if pre is None:
            return serialize(record, _context.get())
        fields, failures = flatten(record, _context.get())
        try:
            return pre.payload(_make(fields)), failures
        except Exception:
            return pre.payload(_make(sanitize(fields))), failures + 1

    # -- per-process state --------------------------------------------------------------
    def _attach(self) -> Counters:
        # Lazily, and again after a fork: a child must not share its parent's slot or ring.
        pid = os.getpid()
        if self._pid != pid or self._counters is None:
            if self._counters is None:
                self._counters = Counters.open(self.config.counters_path)
            slot = self._slot = self._counters.claim_slot(pid, _process_start(pid), _process.process_name(),
                                                          os.getppid())
            self._ring = None  # a forked child's copy of the parent's ring is not its own
            self._pid = pid
            if pid != self.config.owner_pid:
                # Once per process: leave what tells the listener how it ends (see _process),
                # and ring, so that the listener watches it from now, not from its next look.
                _process.watch(slot, os.path.dirname(self.config.counters_path), self.config.capture_output)
                self._ring_bell()
        return self._counters

    def after_fork(self) -> None:
        # A thread of the parent may have held the slot's lock at fork(): the child claims a
        # slot (and a lock) of its own on first use.
        self._slot = None
        self._busy = False
        self._deferred = []
        self._pid = -1
        self._ring = None
        if self._doorbell is not None:
            self._doorbell.pid = os.getpid()

    def _open_ring(self, slot: Slot) -> Optional[RingWriter]:
        cfg = self.config
        path = os.path.join(os.path.dirname(cfg.counters_path), f"ring.{slot.index}")
        try:
            ring = RingWriter(path, cfg.ring_bytes or ring_capacity(cfg.queue_size), cfg.queue_size)
        except OSError:
            return None  # the spool is gone (service stopped) or full (ENOSPC): the caller diverts
        slot.set(S_RING, 1)
        self._ring = ring
        self._ring_bell()  # a new ring: the listener learns of it now, not at its next scan
        return ring

    def _ring_bell(self) -> None:
        bell = self._doorbell
        if bell is None:
            try:
                bell = self._doorbell = FifoWriter(self.config.fifo_path)
            except OSError:
                return  # no listener to wake; it scans the rings when it starts
        try:
            bell.write_record(K_WAKE, b"", 0.0)
        except OSError:
            pass

    def close(self) -> None:
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None

    # -- the record path ------------------------------------------------------------------
    def put_nowait(self, record: logging.LogRecord) -> None:
        """Standard-library ``QueueHandler`` entry point."""
        payload, failures = self.prepare(record)
        self.put_payload(payload, failures)

    put = put_nowait

    def put_payload(self, payload: bytes, failures: int = 0) -> None:
        if self._pid != os.getpid() or self._slot is None:  # first use, or first use after a fork
            try:
                self._attach()
            except OSError:
                self._to_stderr(payload, "[UNDELIVERED] ")
                return
        slot = self._slot
        assert slot is not None
        with slot.lock:
            if self._busy:  # a signal handler, inside this thread's own put: publish it after
                self._deferred.append((payload, failures))
                return
            self._busy = True
            try:
                self._put(payload, failures)
                while self._deferred:
                    self._put(*self._deferred.pop(0))
            finally:
                self._busy = False

    def _put(self, payload: bytes, failures: int) -> None:
        slot = self._slot
        counters = self._counters
        assert slot is not None and counters is not None
        words, base = slot.words, slot.base
        if failures:
            words[base + S_REPLACED] += failures
        if words[1] == STATE_STOPPED:  # the service is gone: tell the user rather than lose it
            self._divert(slot, payload)
            return
        ring = self._ring
        if ring is None:
            ring = self._open_ring(slot)
            if ring is None:
                self._divert(slot, payload)
                return
        try:
            ok: Optional[bool] = ring.write(payload)
        except OSError:  # a big record's own file could not be written (ENOSPC in the spool)
            self._divert(slot, payload)
            return
        if not ok:
            ok = self._overflow(ring, payload)
            if ok is None:
                self._divert(slot, payload)
                return
        if ok:
            words[base + S_SENT] += 1
            self._overflowing = False
            if counters.words[_SLEEPING]:
                # The listener sleeps only when every ring was empty. One bell wakes it; the
                # flag is a hint that any process may clear, so a stalled listener gets one
                # bell, not one per record.
                counters.words[_SLEEPING] = 0
                self._ring_bell()
            return
        words[base + S_DROPPED] += 1
        words[base + S_SENT] += 1
        if self.config.overflow == "stderr":
            self._to_stderr(payload, "[DROPPED] ")
        else:
            self._note_drop()

    def _overflow(self, ring: RingWriter, payload: bytes) -> Optional[bool]:
        """The ring is full. True: written after a wait; False: drop; None: the service is gone."""
        policy = self.config.overflow
        if policy == "drop" or policy == "stderr":
            return False
        if policy == "timeout":
            if self._overflowing:  # one wait per overflow episode, then drops without waiting
                return False
            deadline: Optional[float] = time.monotonic() + self.config.overflow_timeout
        else:
            deadline = None
        self._ring_bell()
        pause = 0.0002
        counters = self._counters
        assert counters is not None
        while True:
            if ring.write(payload):
                return True
            if counters.words[1] == STATE_STOPPED:
                return None
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self._overflowing = True
                return False
            # Waiting is for the listener to commit a batch: poll with a growing pause.
            left = 0.01 if deadline is None else max(0.0, deadline - now)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.01)

    def _divert(self, slot: Slot, payload: bytes) -> None:
        slot.count(S_SENT, S_DIVERTED)
        self._to_stderr(payload, "")

    def _to_stderr(self, payload: bytes, prefix: str) -> None:
        try:
            from ._format import SimplifiedFormatter
            rec = deserialize(payload)
            if rec[0] == TEXT_VERSION:  # formatted here already: its simplified line, or its block
                line = prefix + (rec.simple or rec.full)
            else:
                line = prefix + SimplifiedFormatter().format(rec)
            os.write(_process.err_fd(), line.encode("utf-8", "backslashreplace"))
        except Exception:
            pass  # stderr itself is gone; the record is already counted

    def count_error(self, exc: BaseException) -> None:
        """An unexpected failure in mplog's own code: counted as an error and a drop, said once
        a second on stderr."""
        try:
            self._attach()
            slot = self._slot
            assert slot is not None
            with slot.lock:
                slot.count(S_SENT, S_DROPPED, S_ERRORS)
            self._note_drop(f"internal error {type(exc).__name__}: {exc}")
        except Exception:
            pass

    def _note_drop(self, why: str = "") -> None:
        # One summary a second per process, never a traceback per record.
        self._drops_unreported += 1
        now = time.monotonic()
        if now - self._last_notice >= 1.0 or why:
            n, self._drops_unreported = self._drops_unreported, 0
            self._last_notice = now
            reason = why or f"the log spool is full (overflow={self.config.overflow!r})"
            msg = f"mplog: {n} record(s) dropped by process {os.getpid()}: {reason}\n"
            try:
                os.write(_process.err_fd(), msg.encode("utf-8", "backslashreplace"))
            except OSError:
                pass


class MPQueueHandler(logging.handlers.QueueHandler):
    """A ``QueueHandler`` whose ``prepare`` flattens the record to bytes in the calling thread
    and whose ``enqueue`` writes them to the service FIFO."""

    def __init__(self, config: WorkerConfig) -> None:
        logging.Handler.__init__(self, config.level)
        self.config = config
        self.queue: Channel = _channel_for(config)  # type: ignore[assignment]
        self.listener = None

    def prepare(self, record: logging.LogRecord) -> Any:  # type: ignore[override]
        return self.queue.prepare(record)

    def enqueue(self, prepared: Any) -> None:  # type: ignore[override]
        payload, failures = prepared
        self.queue.put_payload(payload, failures)

    def handle(self, record: logging.LogRecord) -> Any:
        # Handler.handle() takes the handler's lock around emit(); ours needs none (each frame is
        # one atomic write, and the counters have their own lock), so skip it on the hot path.
        if self.filters:
            rv = self.filter(record)
            if not rv:
                return rv
            if isinstance(rv, logging.LogRecord):
                record = rv
        self.emit(record)
        return record

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.enqueue(self.prepare(record))
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # An unexpected failure in our own code: counted as an error, and said.
        self.queue.count_error(sys.exc_info()[1] or RuntimeError("unknown error"))


# -- per-process installation ---------------------------------------------------------------
_WATCH_WAIT = 0.05  # seconds worker_init waits, at most, for the listener to watch it
_channels: Dict[str, Channel] = {}
_installed: Optional[MPQueueHandler] = None
_service_read_fds: Dict[int, int] = {}  # fd -> pid of the main process that owns it


def _channel_for(config: WorkerConfig) -> Channel:
    channel = _channels.get(config.service_id)
    if channel is None:
        channel = _channels[config.service_id] = Channel(config)
    return channel


def _after_fork_in_child() -> None:
    _process.after_fork_in_child()
    for channel in _channels.values():
        channel.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _coerce(config: Union[WorkerConfig, str, Dict[str, Any]]) -> WorkerConfig:
    if isinstance(config, WorkerConfig):
        return config
    if isinstance(config, str):
        return WorkerConfig.from_json(config)
    if isinstance(config, dict):
        return WorkerConfig(**config)
    raise TypeError(f"expected a WorkerConfig, got {type(config).__name__}")


def _close_inherited_read_ends() -> None:
    # A forked child holds a copy of the main process's read end of the FIFO. Left open, it
    # would keep writers from ever seeing EPIPE after the service stops.
    me = os.getpid()
    for fd, owner in list(_service_read_fds.items()):
        if owner != me:
            try:
                os.close(fd)
            except OSError:
                pass
            del _service_read_fds[fd]


def install(config: Union[WorkerConfig, str, Dict[str, Any]]) -> MPQueueHandler:
    """Route this process's root logger to the service. Replaces the root's handlers (a forked
    child's inherited ones included) so no line is written twice. May raise; see worker_init."""
    global _installed
    cfg = _coerce(config)
    _close_inherited_read_ends()
    handler = MPQueueHandler(cfg)
    counters = handler.queue._attach()  # claim the slot now: fail here, not in the first logging call
    slot = handler.queue._slot
    if slot is not None and os.getpid() != cfg.owner_pid:
        # A worker that dies a few ms after it starts (its first task crashes) must not die
        # before the listener holds a pidfd for it, or its exit status is lost: wait, briefly.
        _process.wait_watched(slot, counters, _WATCH_WAIT)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.level)
    if cfg.capture_warnings:
        logging.captureWarnings(True)
    _installed = handler
    return handler


def uninstall(handler: Optional[MPQueueHandler] = None) -> None:
    global _installed
    handler = handler or _installed
    if handler is None:
        return
    logging.getLogger().removeHandler(handler)
    if handler is _installed:
        _installed = None


def worker_init(config: Union[WorkerConfig, str, Dict[str, Any]]) -> None:
    """Pool initializer: send this process's logging to the service.

    Never raises: a raising initializer makes ``multiprocessing.Pool`` respawn workers forever
    (cpython #87472). On failure, records go to stderr instead, and the reason is printed once.
    """
    try:
        install(config)
    except BaseException as exc:  # noqa: B036 - even SystemExit must not escape an initializer
        try:
            root = logging.getLogger()
            for old in list(root.handlers):
                root.removeHandler(old)
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s: %(message)s",
                                                   "%Y-%m-%d %H:%M:%S"))
            root.addHandler(handler)
            sys.stderr.write(f"mplog: worker {os.getpid()} logs to stderr: {type(exc).__name__}: {exc}\n")
        except Exception:
            pass


def current_config() -> Optional[WorkerConfig]:
    """The config of the service this process logs to, or None."""
    return _installed.config if _installed is not None else None


def pool_kwargs() -> Dict[str, Any]:
    """``initializer``/``initargs`` for a pool started inside a worker (a nested pool), so its
    processes log to the same service. Empty if this process is not logging to one."""
    cfg = current_config()
    return {} if cfg is None else {"initializer": worker_init, "initargs": (cfg,)}
