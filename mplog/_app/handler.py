"""The worker side: a ``QueueHandler`` that publishes records into this process's ring.

Every process that logs (workers, the main process, plain ``Process`` children, nested pools)
runs only this module's code per record: flatten (and, with the default formats, format) the
record in the calling thread, then copy it into the process's own ring in the service's spool
(``_common.spool.RingWriter``): a memory copy, no system call, no lock shared with another
process. The record is in the spool, which outlives this process and the listener, when the
logging call returns; memory is bounded by the ring. When the listener sleeps (every ring was
empty), one byte-sized frame on the FIFO wakes it. Logging never raises into the caller:
failures become placeholders, drops and stderr lines, each counted in this process's slot of
the shared counters.

Who does what:

- ``SpoolHandler``: the ``logging.Handler``; its ``handle`` is the hot path (one C call).
- ``Channel`` (``channel``): the record path from a payload to the ring, the overflow policy,
  the divert to stderr, the doorbell, the slot and the ring of this process.
- ``ServiceQueue``: the queue-shaped door for the standard library's ``QueueHandler``.
- ``install``/``worker_init``: this process's root logger routed to the service.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .._common.worker_config import WorkerConfig, coerce as _coerce
from . import process as _process
from .._common.record import _STANDARD_LEN, MARSHAL_VERSION, TAG_COMMON, common_fields, lean_fields, record_dumps
from .channel import _context, Channel, context, current_context as _context_get  # noqa: F401 - dask.py reads _context here

__all__ = ["SpoolHandler", "MPQueueHandler", "ServiceQueue", "Channel", "worker_init", "install", "uninstall", "context",
           "current_config", "pool_kwargs"]

_LogRecord = logging.LogRecord


class SpoolHandler(logging.Handler):
    """The handler every process logs through: it publishes each record into this process's
    ring in the service's spool, where the listener process takes it to the two files.

    ``config`` is the service's ``WorkerConfig`` (or its JSON, or a dict of it), so the handler
    can be declared in ``dictConfig`` in a worker: ``{"()": "mplog.SpoolHandler", "config": ...}``.
    A formatter set on it (``setFormatter``, dictConfig's ``formatter``, structlog's
    ``ProcessorFormatter``) renders the message text; the files' own formats do the rest.
    ``flush()`` returns once every record this process logged is in the files.
    """

    def __init__(self, config: Union[WorkerConfig, str, Dict[str, Any]], level: Any = None) -> None:
        cfg = _coerce(config)
        logging.Handler.__init__(self, cfg.level if level is None else level)
        self.config = cfg
        self.channel: Channel = _channel_for(cfg)
        self._fields = lean_fields if cfg.lean else common_fields  # see _record.TAG_COMMON
        self._dumps = record_dumps()  # compiled or marshal's own, chosen per handler
        self.flush_hook: Any = None  # set by LogService in the main process: the service's barrier
        # QueueHandler's (3.12+): dictConfig sets it on a QueueHandler it made with a listener.
        # The listener here is a process of the service, not an object of this one: None.
        self.listener: Any = None

    @property
    def queue(self) -> "ServiceQueue":
        """The service's queue, for code that wants one (``QueueHandler(handler.queue)``)."""
        return ServiceQueue(self.config)

    _emit_is_ours = True  # False in a subclass with its own emit(): handle() then always calls it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_emit_is_ours" not in cls.__dict__:  # a subclass may say its emit() needs no call
            # QueueHandler's hooks: a subclass that overrides prepare() or enqueue() (to add a
            # field, say) has them called for every record, as QueueHandler.emit() would.
            cls._emit_is_ours = (cls.emit is SpoolHandler.emit and cls.prepare is SpoolHandler.prepare
                                 and cls.enqueue is SpoolHandler.enqueue)

    def handle(self, record: logging.LogRecord) -> Any:
        # Handler.handle() takes the handler's lock around emit(); ours needs none (the ring has
        # its process's own lock), so skip it on the hot path.
        if self.filters:
            rv = self.filter(record)
            if not rv:
                return rv
            if isinstance(rv, logging.LogRecord):
                record = rv
        channel = self.channel
        d = record.__dict__
        if (len(d) == _STANDARD_LEN and type(record) is _LogRecord and self.formatter is None
                and not channel.dedupe and self._emit_is_ours and _context_get() is None):
            # The common record (_record.common_payload, inlined: this is the caller's whole
            # cost, see scripts/bench.py). First the compiled ring's publish_record: the same
            # payload, made and published in one C call (0: not done, for any reason).
            publish = channel._publish_record
            if publish is not None:
                try:
                    done = publish(d)
                    if done:
                        if done == 2:
                            channel._wake_locked()
                        return record
                except Exception:
                    self.handleError(record)
                    return record
            try:
                payload = self._dumps((TAG_COMMON, self._fields(d)), MARSHAL_VERSION)
            except (ValueError, KeyError):
                pass
            else:
                try:
                    channel.put_payload(payload, record)
                except Exception:
                    self.handleError(record)
                return record
        self.emit(record)
        return record

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """``QueueHandler.prepare``: the object returned is what ``enqueue`` sends. The record
        goes as it is: ``enqueue`` turns it into plain fields and the listener formats it, so
        nothing is merged or dropped here. Override it to send a modified copy."""
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        """``QueueHandler.enqueue``: publish the record into this process's ring (the overflow
        policy applies when it is full). May raise; ``emit`` counts the failure."""
        channel = self.channel
        if channel.dedupe and channel.seen_before(record):
            return
        if self.formatter is None:
            payload, failures = channel.prepare(record)
            channel.put_payload(payload, record, failures)
        else:
            message = self._render(record)
            payload, failures = channel.prepare(record, message)
            channel.put_payload(payload, record, failures, message)

    def emit(self, record: logging.LogRecord) -> None:
        """``QueueHandler.emit``: ``enqueue(prepare(record))``; a failure is counted, never raised."""
        try:
            self.enqueue(self.prepare(record))
        except Exception:
            self.handleError(record)

    def _render(self, record: logging.LogRecord) -> str:
        # The formatter renders the message only: the traceback and stack keep their own
        # places in the full log, so the formatter sees a copy without them.
        assert self.formatter is not None
        if record.exc_info or record.exc_text or record.stack_info:
            bare = logging.makeLogRecord(record.__dict__)
            bare.exc_info = bare.exc_text = bare.stack_info = None
            record = bare
        text = self.formatter.format(record)
        return text if type(text) is str else str(text)

    def flush(self) -> None:
        hook = self.flush_hook
        if hook is not None:
            hook(self.config.flush_timeout)
        else:
            self.channel.wait_written(self.config.flush_timeout)

    def handleError(self, record: logging.LogRecord) -> None:
        # An unexpected failure in our own code: counted as an error, and said.
        self.channel.count_error(sys.exc_info()[1] or RuntimeError("unknown error"))


class MPQueueHandler(SpoolHandler):
    """Deprecated name of ``SpoolHandler`` (it was never a queue handler)."""

    def __init__(self, config: Union[WorkerConfig, str, Dict[str, Any]], level: Any = None) -> None:
        import warnings
        warnings.warn("mplog.MPQueueHandler is deprecated; use mplog.SpoolHandler", DeprecationWarning, stacklevel=2)
        super().__init__(config, level)


class ServiceQueue:
    """A queue-shaped door into the service, for code that expects one: the standard library's
    ``QueueHandler(svc.queue)``, and dictConfig's ``"queue"`` (3.12+).

    It pickles (as the service's ``WorkerConfig``) into children under every start method.
    ``put``/``put_nowait`` take a LogRecord and never block (the spool has room, or the
    service's overflow policy applies); ``None``, QueueListener's stop sentinel, is ignored.
    ``qsize``/``empty``/``full`` come from the spool. The listener process is the one consumer,
    so ``get``, ``get_nowait``, ``task_done`` and ``join`` exist only for dictConfig's check and
    raise ``NotImplementedError`` saying so. A record that also reaches mplog's own handler is
    sent once.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        # From now on this process's records are checked for doubles (see Channel.seen_before).
        _channel_for(config).dedupe = True

    def __reduce__(self) -> Any:
        return (ServiceQueue, (self.config,))

    def __repr__(self) -> str:
        return f"<mplog.ServiceQueue of service {self.config.service_id}>"

    def _channel(self) -> Channel:
        channel = _channel_for(self.config)
        channel.dedupe = True
        return channel

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        if item is None:
            return  # QueueListener's sentinel: there is no listener thread to stop here
        if not isinstance(item, logging.LogRecord):
            raise TypeError(f"mplog's queue takes logging.LogRecord objects, not {type(item).__name__}")
        channel = self._channel()
        try:
            if channel.seen_before(item):
                return
            record = _split_traceback(item)
            payload, failures = channel.prepare(record)
            channel.put_payload(payload, record, failures)
        except Exception as exc:
            channel.count_error(exc)

    def put_nowait(self, item: Any) -> None:
        self.put(item, False)

    def qsize(self) -> int:
        return self._channel().backlog()

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self._channel().full()

    def _consumer(self, *_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError("mplog's queue has one consumer, the listener process; "
                                  "do not start a QueueListener on it")

    get = get_nowait = task_done = join = _consumer


_TRACEBACK = "\nTraceback (most recent call last):\n"


def _split_traceback(record: logging.LogRecord) -> logging.LogRecord:
    # QueueHandler.prepare merges the traceback into the message and drops exc_info: put it
    # back in its own place, so the simplified log shows the message line, not the traceback.
    msg = record.msg
    if record.exc_info or record.exc_text or type(msg) is not str or _TRACEBACK not in msg:
        return record
    head, _, tail = msg.partition(_TRACEBACK)
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args = head, None
    copy.exc_text = "Traceback (most recent call last):\n" + tail
    return copy


# -- per-process installation ---------------------------------------------------------------
_WATCH_WAIT = 0.05  # seconds worker_init waits, at most, for the listener to watch it
_channels: Dict[str, Channel] = {}
_installed: Optional[SpoolHandler] = None
_inherited: List[Any] = []  # weak references to handlers that existed when this process was forked
_service_read_fds: Dict[int, int] = {}  # fd -> pid of the main process that owns it


def _channel_for(config: WorkerConfig) -> Channel:
    channel = _channels.get(config.service_id)
    if channel is None:
        channel = _channels[config.service_id] = Channel(config)
    return channel


def close_channel(config: WorkerConfig) -> None:
    """The service of ``config`` has stopped: this process lets go of its channel (ring,
    counters, doorbell), and the next service gets a channel of its own."""
    channel = _channels.pop(config.service_id, None)
    if channel is not None:
        channel.close()


def _after_fork_in_child() -> None:
    import weakref
    _process.after_fork_in_child()
    for channel in _channels.values():
        channel.after_fork()
    _close_inherited_read_ends()  # the FIFO's read end and the file set's lock are the parent's
    # Handlers a forked child inherited write through the parent's files: install() removes them.
    _inherited[:] = [weakref.ref(h) for h in _all_handlers()]


def _all_handlers() -> List[logging.Handler]:
    found: List[logging.Handler] = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            found.extend(logger.handlers)
    return found


def _drop_inherited_handlers(keep: Any) -> None:
    """Remove the handlers this forked child inherited from every logger, and close them
    without writing: their buffered bytes are the parent's, and a FileHandler's fd is pointed
    at /dev/null first so a late flush cannot duplicate the parent's lines."""
    inherited = {id(h) for h in (ref() for ref in _inherited) if h is not None}
    if not inherited:
        return
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    closing = {}
    for logger in loggers:
        for h in list(logger.handlers):
            if id(h) in inherited and h is not keep:
                logger.removeHandler(h)
                closing[id(h)] = h
    for h in closing.values():
        stream = getattr(h, "stream", None)
        if isinstance(h, logging.FileHandler) and stream is not None:
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
                os.close(null)
            except (OSError, ValueError):
                pass
        try:
            if isinstance(h, logging.FileHandler):
                h.close()
        except Exception:
            pass
    _inherited.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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


def install(config: Union[WorkerConfig, str, Dict[str, Any]], *,
            handler_factory: Optional[Callable[[WorkerConfig], SpoolHandler]] = None) -> SpoolHandler:
    """Route this process's root logger to the service. Replaces the root's handlers, and
    removes the handlers a forked child inherited from every logger, so no line is written
    twice; applies the main process's logger levels. May raise; see worker_init.
    ``handler_factory`` makes the handler (the capture of pools started without the
    initializer uses its own, see _capture)."""
    global _installed
    cfg = _coerce(config)
    _close_inherited_read_ends()
    handler = (handler_factory or SpoolHandler)(cfg)
    counters = handler.channel._attach()  # claim the slot now: fail here, not in the first logging call
    slot = handler.channel._slot
    if slot is not None and os.getpid() != cfg.owner_pid:
        # A worker that dies a few ms after it starts (its first task crashes) must not die
        # before the listener holds a pidfd for it, or its exit status is lost: wait, briefly.
        _process.wait_watched(slot, counters, _WATCH_WAIT)
        # Captured at its start (_capture), this process got its hooks before _bootstrap ran;
        # the hook on a Process target's traceback can only go in from inside it: now.
        _process.ExceptionHooks.install_in_process()
    _drop_inherited_handlers(handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(cfg.level)
    for name, level in cfg.levels:
        # The levels the main process had set when it made this config (pool_kwargs()).
        logging.getLogger(name).setLevel(level)
    if cfg.capture_warnings:
        logging.captureWarnings(True)
    _installed = handler
    return handler


def uninstall(handler: Optional[SpoolHandler] = None) -> None:
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
    return {} if cfg is None else {"initializer": worker_init, "initargs": (with_levels(cfg),)}


def logger_levels() -> Tuple[Tuple[str, int], ...]:
    """The levels set on named loggers in this process, to apply in workers (spawn and
    forkserver start with fresh loggers; fork inherits them anyway)."""
    out = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            out.append((name, logger.level))
    return tuple(sorted(out))


def with_levels(cfg: WorkerConfig) -> WorkerConfig:
    return cfg._replace(levels=logger_levels())
