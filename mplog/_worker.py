"""The worker side: a ``QueueHandler`` that writes records into the service's FIFO.

Every process that logs (workers, the main process, plain ``Process`` children, nested pools)
runs only this module's code per record: flatten the record in the calling thread
(``_record.serialize``), then one non-blocking ``write()`` per frame. Nothing is buffered in
the process, so a record is safe in the kernel when the logging call returns, and a stalled
listener cannot grow the process's memory. Logging never raises into the caller: failures
become placeholders, drops and stderr lines, each counted in this process's slot of the shared
counters.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import logging.handlers
import os
import sys
import threading
import time
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from ._config import WorkerConfig
from ._counters import STATE_DEGRADED, STATE_STOPPED, STATE_STOPPING, Counters
from ._format import Preformatter
from ._record import TEXT_VERSION, _make, deserialize, flatten, sanitize, serialize
from ._transport import K_RECORD, FifoWriter

__all__ = ["MPQueueHandler", "Channel", "worker_init", "install", "uninstall", "context",
           "current_config", "pool_kwargs"]

# Slot word offsets (see _counters.SLOT_FIELDS).
_SENT, _DROPPED, _REPLACED, _DIVERTED, _WRITING = 1, 2, 3, 4, 5

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
    """This process's connection to one service: FIFO writer, counter slot, overflow policy.

    Quacks like a queue for the standard library: ``QueueHandler(svc.queue)`` works, because
    ``put_nowait`` accepts a LogRecord.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._pid = -1
        self._writer: Optional[FifoWriter] = None
        self._counters: Optional[Counters] = None
        self._slot = -1
        self._drops_unreported = 0
        self._last_notice = 0.0
        self._timeout = None if config.overflow == "block" else config.overflow_timeout
        if config.overflow == "drop":
            self._timeout = 0.0
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
        # Lazily, and again after a fork: a child must not share its parent's slot or stream id.
        pid = os.getpid()
        if self._pid != pid or self._counters is None:
            self._pid = pid
            if self._counters is None:
                self._counters = Counters.open(self.config.counters_path)
            self._slot = self._counters.claim_slot(pid)
            if self._writer is not None:
                self._writer.pid = pid
        return self._counters

    def after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at fork()
        self._pid = -1

    def _writer_or_none(self) -> Optional[FifoWriter]:
        if self._writer is None:
            try:
                self._writer = FifoWriter(self.config.fifo_path)
            except OSError:
                return None  # no service there (stopped, or never started): the caller diverts
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- the record path ------------------------------------------------------------------
    def put_nowait(self, record: logging.LogRecord) -> None:
        """Standard-library ``QueueHandler`` entry point."""
        payload, failures = self.prepare(record)
        self.put_payload(payload, failures)

    put = put_nowait

    def put_payload(self, payload: bytes, failures: int = 0) -> None:
        if self._pid < 0 or self._counters is None:  # first use, or first use after a fork
            try:
                self._attach()
            except OSError:
                self._to_stderr(payload, "[UNDELIVERED] ")
                return
        words = self._counters.words  # type: ignore[union-attr]
        slot = self._slot
        if failures:
            with self._lock:
                words[slot + _REPLACED] += failures
        state = words[1]
        if state == STATE_DEGRADED or state == STATE_STOPPED:
            self._divert(words, slot, payload)
            return
        writer = self._writer_or_none()
        if writer is None:
            self._divert(words, slot, payload)
            return
        # ``writing`` marks the window between the write and its count: a process killed there
        # leaves a record written but not counted as sent, which stop() then settles.
        with self._lock:
            words[slot + _WRITING] += 1
        try:
            ok = writer.write_record(K_RECORD, payload, self._timeout, self._give_up, self._count_sent)
        except OSError:
            with self._lock:
                words[slot + _WRITING] -= 1
            # EPIPE: every reader is gone (service stopped). Tell the user rather than lose it.
            self._divert(words, slot, payload)
            return
        if not ok:
            with self._lock:
                words[slot + _WRITING] -= 1
                words[slot + _SENT] += 1
                words[slot + _DROPPED] += 1
            if self.config.overflow == "stderr":
                self._to_stderr(payload, "[DROPPED] ")
            else:
                self._note_drop()

    def _count_sent(self) -> None:
        # Counted once the first frame is in the pipe, not before: a process killed while it
        # waited for room never sent anything (its logging call never returned).
        words = self._counters.words  # type: ignore[union-attr]
        with self._lock:
            words[self._slot + _SENT] += 1
            words[self._slot + _WRITING] -= 1

    def _give_up(self) -> bool:
        # A blocked writer stops waiting once the service can no longer drain the pipe.
        counters = self._counters
        return counters is not None and counters.words[1] in (STATE_DEGRADED, STATE_STOPPING, STATE_STOPPED)

    def _divert(self, words: Any, slot: int, payload: bytes) -> None:
        with self._lock:
            words[slot + _SENT] += 1
            words[slot + _DIVERTED] += 1
        self._to_stderr(payload, "")

    def _to_stderr(self, payload: bytes, prefix: str) -> None:
        try:
            from ._format import SimplifiedFormatter
            rec = deserialize(payload)
            if rec[0] == TEXT_VERSION:  # formatted here already: its simplified line, or its block
                line = prefix + (rec.simple or rec.full)
            else:
                line = prefix + SimplifiedFormatter().format(rec)
            os.write(2, line.encode("utf-8", "backslashreplace"))
        except Exception:
            pass  # stderr itself is gone; the record is already counted

    def _note_drop(self) -> None:
        # One summary a second per process, never a traceback per record.
        self._drops_unreported += 1
        now = time.monotonic()
        if now - self._last_notice >= 1.0:
            n, self._drops_unreported = self._drops_unreported, 0
            self._last_notice = now
            msg = (f"mplog: {n} record(s) dropped by process {os.getpid()}: the log queue is full "
                   f"(overflow={self.config.overflow!r})\n")
            try:
                os.write(2, msg.encode())
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
        # An unexpected failure in our own code: count it as a drop and say so, once a second.
        try:
            channel = self.queue
            counters = channel._attach()
            with channel._lock:
                counters.words[channel._slot + _SENT] += 1
                counters.words[channel._slot + _DROPPED] += 1
            channel._note_drop()
        except Exception:
            pass


# -- per-process installation ---------------------------------------------------------------
_channels: Dict[str, Channel] = {}
_installed: Optional[MPQueueHandler] = None
_service_read_fds: Dict[int, int] = {}  # fd -> pid of the main process that owns it


def _channel_for(config: WorkerConfig) -> Channel:
    channel = _channels.get(config.service_id)
    if channel is None:
        channel = _channels[config.service_id] = Channel(config)
    return channel


def _after_fork_in_child() -> None:
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
    handler.queue._attach()  # claim the slot now: fail here, not in the first logging call
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
