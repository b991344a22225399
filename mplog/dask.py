"""Dask ``distributed`` integration: records logged inside Dask tasks, on any worker, reach the
client's ``LogService`` (``pip install 'mplog[dask]'``).

How a record travels, with Dask's own mechanisms only (no socket of ours):

1. ``MplogWorkerPlugin`` (a ``distributed.WorkerPlugin``, registered on every current and future
   worker, so a worker that a nanny restarts gets it too) adds a handler to the worker process's
   root logger. The handler flattens each record, in the logging thread, into a dict of plain
   values (``str``/``int``/``float``/``bool``/``None``; the message already formatted, the
   traceback already text, each extra rendered to text, failures replaced by placeholders the
   same way as ``mplog._common.record`` does) and appends it to a bounded buffer. A full buffer drops
   the record and counts it: a task is never blocked and a logging call never raises.
2. A periodic callback on the worker's event loop (and an early one when a batch is full)
   sends the buffer in batches with ``Worker.log_event(topic, batch)``: the worker's existing
   batched stream to the scheduler. The scheduler stamps each batch with the address of the
   worker it came from and publishes it to the subscribers of the topic.
3. The client subscribed to the topic (``Client.subscribe_topic``). Its handler runs in the
   client's event-loop thread, checks every field of every record (types and sizes; anything
   else becomes a counted placeholder record), rebuilds a ``logging.LogRecord`` with
   ``logging.makeLogRecord`` (plain data only: nothing from the network is unpickled), adds
   ``dask_worker`` (the scheduler's address for the sender) to its Context, and hands it to
   ``svc.queue.put_nowait``: the service's listener stays the only writer of the files.
   On the client, ``_Receiver`` is that handler (and the per-worker sequence and counters),
   ``_TopicHistory`` clears the scheduler's copy of the topic, and ``DaskLogForwarder`` is
   what the user holds: ``counts``, ``flush()``, ``close()``.

Usage::

    import mplog, mplog.dask
    from distributed import Client, LocalCluster

    with mplog.LogService("logs") as svc, LocalCluster(n_workers=4) as cluster, \\
            Client(cluster) as client:
        with mplog.dask.forward_dask_logs(client, svc) as fwd:
            client.gather(client.map(work, items))
            fwd.flush()                 # every record logged so far is in the files
        print(fwd.counts)

``mplog`` must be importable on the workers (it is, on a ``LocalCluster``). The client must be
synchronous (``Client(..., asynchronous=False)``, the default).

What is lost, and what is counted:

- a worker's buffer full (``max_buffer`` records, the client slower than the tasks or the worker
  cut off from the scheduler): dropped, counted in the worker, reported in its next batch,
  ``counts["dropped_in_workers"]`` and a warning record in the log;
- a record or batch that fails the client's checks: a placeholder record, ``counts["malformed"]``;
- a worker killed (SIGKILL, OOM killer): the records it logged since its last send (at most
  ``interval`` seconds' worth, 0.1 s by default, plus Dask's 2 ms batching) die with it. Nobody
  alive knows how many, so they cannot be counted; the end without a final batch is detected
  by ``flush()`` and ``close()``, counted in ``counts["workers_ended_without_final"]`` and
  reported by a warning record. A worker that closes normally (retired, scaled down, the
  cluster closed, the plugin unregistered) sends everything in a final batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import distributed  # type: ignore[import-not-found,unused-ignore]

from ._common.record import _STANDARD, USER_MESSAGE_KEY, _describe, _message, safe_text
from ._app import capture as _capture
from ._app.handler import _context

__all__ = ["MplogWorkerPlugin", "DaskLogForwarder", "forward_dask_logs"]

_FORMAT = 1  # version of the batch format
PLACEHOLDER_LOGGER = "mplog.dask"  # logger name of the notices and placeholders this module makes
WORKER_KEY = "dask_worker"  # the Context key that names the worker

# Limits. The worker cuts what it sends to these; the client rejects anything beyond them.
MAX_TEXT = 256 * 1024  # message, traceback, stack: characters each
MAX_NAME = 1024  # logger name, path, function, process and thread names, level name
MAX_EXTRAS = 64  # extras per record
MAX_EXTRA_KEY = 200
MAX_EXTRA_VALUE = 64 * 1024 + 64  # safe_text's cut plus its marker
MAX_BATCH_RECORDS = 10000  # hard limit of the client; the plugin's batch_records must be below
MAX_ADDRESS = 512
_CUT_SLACK = 64  # room for the "... [N more characters]" marker
_MAX_INT = 2 ** 63 - 1


# -- worker side ---------------------------------------------------------------------------------
def _utf8(text: str) -> str:
    """Text msgpack can encode: lone surrogates become visible escapes (``\\udc80``)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _cut(text: str, limit: int) -> str:
    if len(text) > limit:
        return text[:limit] + f"... [{len(text) - limit} more characters]"
    return text


def _plain_str(value: Any, limit: int) -> Tuple[str, int]:
    if type(value) is str:
        return _utf8(_cut(value, limit)), 0
    if value is None:
        return "", 0
    text, bad = safe_text(value)
    return _utf8(_cut(text, limit)), bad


def _plain_int(value: Any) -> int:
    if type(value) is int and -_MAX_INT <= value <= _MAX_INT:
        return value
    try:
        number = int(value)
        return number if -_MAX_INT <= number <= _MAX_INT else 0
    except Exception:
        return 0


def flatten_record(record: logging.LogRecord) -> Tuple[Dict[str, Any], int, int]:
    """A LogRecord as a dict of plain values (what a worker sends). Never raises (except
    KeyboardInterrupt); returns (dict, placeholders used, approximate size in characters)."""
    failures = 0
    msg, bad = _message(record)
    failures += bad
    d = record.__dict__
    extras: Dict[str, str] = {}
    size = 0
    context = _context.get()
    items: List[Tuple[Any, Any]] = list(context.items()) if context else []
    items.extend((key, d[key]) for key in d.keys() - _STANDARD if key != USER_MESSAGE_KEY)
    skipped = 0
    for key, value in items:
        if len(extras) >= MAX_EXTRAS - 1:
            skipped += 1
            continue
        name, bad = _plain_str(key, MAX_EXTRA_KEY - _CUT_SLACK)
        failures += bad
        if name == WORKER_KEY:  # the worker's address is ours to give; keep the record's own too
            name = WORKER_KEY + "_extra"
        text, bad = safe_text(value)
        failures += bad
        if size + len(text) > MAX_TEXT:  # all extras together: at most what one message may be
            skipped += 1
            continue
        text = _utf8(text)
        extras[name or "?"] = text
        size += len(name) + len(text)
    if skipped:
        extras["mplog_extras_cut"] = (f"{skipped} extra(s) not sent (at most {MAX_EXTRAS}, "
                                      f"{MAX_TEXT} characters in all)")
    exc_text = record.exc_text
    if record.exc_info and record.exc_info[0] is not None and not exc_text:
        try:
            exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        except BaseException as exc:  # noqa: B036 - a __str__ may raise anything
            if isinstance(exc, KeyboardInterrupt):
                raise
            exc_text = f"<traceback could not be formatted: {_describe(exc)}>"
            failures += 1
    flat: Dict[str, Any] = {
        "name": _plain_str(record.name, MAX_NAME)[0],
        "levelno": _plain_int(record.levelno),
        "levelname": _plain_str(record.levelname, MAX_NAME)[0],
        "msg": _utf8(_cut(msg, MAX_TEXT)),
        "pathname": _plain_str(record.pathname, MAX_NAME)[0],
        "lineno": _plain_int(record.lineno),
        "funcName": _plain_str(record.funcName, MAX_NAME)[0],
        "processName": _plain_str(record.processName, MAX_NAME)[0],
        "process": _plain_int(record.process),
        "threadName": _plain_str(record.threadName, MAX_NAME)[0],
        "created": float(record.created) if type(record.created) in (int, float) else time.time(),
        "exc_text": None if not exc_text else _plain_str(exc_text, MAX_TEXT)[0],
        "stack_info": None if not record.stack_info else _plain_str(record.stack_info, MAX_TEXT)[0],
        "extras": extras,
        "user": bool(d.get(USER_MESSAGE_KEY)),
    }
    size += len(flat["msg"]) + len(flat["exc_text"] or "") + len(flat["stack_info"] or "") + 200
    return flat, failures, size


class _BufferHandler(logging.Handler):
    """Root handler in a Dask worker: flatten, then append to the plugin's bounded buffer."""

    def __init__(self, plugin: "MplogWorkerPlugin", level: int) -> None:
        super().__init__(level)
        self.plugin = plugin

    def emit(self, record: logging.LogRecord) -> None:
        try:
            flat, failures, size = flatten_record(record)
            self.plugin._append(flat, failures, size)
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # Our own failure: the record is dropped and counted, never a traceback on stderr.
        try:
            self.plugin._count_drop()
        except Exception:
            pass


def _connected(worker: Any) -> bool:
    stream = getattr(worker, "batched_stream", None)
    comm = getattr(stream, "comm", None)
    try:
        return comm is not None and not comm.closed()
    except Exception:
        return False


class MplogWorkerPlugin(distributed.WorkerPlugin):
    """Forwards the worker process's log records to the client in batches of Dask events on
    ``topic``. Registered by ``forward_dask_logs``; only configuration is pickled."""

    idempotent = False

    def __init__(self, topic: str = "mplog", level: Union[int, str] = logging.DEBUG, interval: float = 0.1,
                 max_buffer: int = 10000, batch_records: int = 500, batch_chars: int = 1024 * 1024,
                 name: Optional[str] = None) -> None:
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty string")
        if not 0 < batch_records <= MAX_BATCH_RECORDS:
            raise ValueError(f"batch_records must be in 1..{MAX_BATCH_RECORDS}")
        if not interval > 0:
            raise ValueError("interval must be > 0")
        if max_buffer < 1:
            raise ValueError("max_buffer must be >= 1")
        self.topic = topic
        self.level: int = logging._checkLevel(level)  # type: ignore[attr-defined]
        self.interval = float(interval)
        self.max_buffer = int(max_buffer)
        self.batch_records = int(batch_records)
        self.batch_chars = int(batch_chars)
        self.name = name or f"mplog-{topic}"

    # -- lifecycle (on the worker's event loop) ----------------------------------------------
    def setup(self, worker: Any) -> None:
        self._worker = worker
        self._address = str(worker.address)
        self._instance = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._buffer: Deque[Tuple[Dict[str, Any], int]] = deque()
        self._dropped = 0  # cumulative, for this plugin instance
        self._replaced = 0
        self._seq = 0  # batches sent
        self._dropped_sent = 0  # the count the last batch carried
        self._wake_pending = False
        self._closed = False
        self._loop = worker.loop
        # A worker process that mplog captured by itself (a LocalCluster started while a
        # LogService runs) would send each record twice: this explicit route takes over.
        self._released = _capture.release() is not None
        root = logging.getLogger()
        self._saved_level: Optional[int] = None
        if root.level != logging.NOTSET and root.level > self.level:
            # Dask workers leave the root at WARNING: the records we forward must get through.
            self._saved_level = root.level
            root.setLevel(self.level)
        self._handler = _BufferHandler(self, self.level)
        root.addHandler(self._handler)
        from tornado.ioloop import PeriodicCallback  # type: ignore[import-not-found,unused-ignore]
        self._callback = PeriodicCallback(self._tick, self.interval * 1000)
        self._callback.start()

    def teardown(self, worker: Any) -> None:
        handler = getattr(self, "_handler", None)
        if handler is None:
            return
        self._callback.stop()
        root = logging.getLogger()
        root.removeHandler(handler)
        if self._saved_level is not None and root.level == self.level:
            root.setLevel(self._saved_level)
        self._closed = True
        self.send(final=True)
        if getattr(self, "_released", False):
            _capture.resume()

    # -- the logging thread's side ----------------------------------------------------------
    def _append(self, flat: Dict[str, Any], failures: int, size: int) -> None:
        wake = False
        with self._lock:
            self._replaced += failures
            if self._closed or len(self._buffer) >= self.max_buffer:
                self._dropped += 1
                return
            self._buffer.append((flat, size))
            if len(self._buffer) >= self.batch_records and not self._wake_pending:
                self._wake_pending = wake = True
        if wake:
            try:
                self._loop.add_callback(self._tick)
            except Exception:
                pass  # the loop is closing; the periodic send or teardown takes the records

    def _count_drop(self) -> None:
        with self._lock:
            self._dropped += 1

    # -- the event loop's side ----------------------------------------------------------------
    def _tick(self) -> None:
        try:
            self.send()
        except Exception:
            pass  # never let the periodic callback die

    def send(self, final: bool = False) -> Tuple[str, int]:
        """Send what is buffered (on the worker's event loop). Returns (instance, last sequence
        number sent), what ``DaskLogForwarder.flush`` waits for."""
        with self._lock:
            self._wake_pending = False
        if not final and not _connected(self._worker):
            # Worker.batched_send drops messages silently while disconnected: keep them here.
            return self._instance, self._seq
        while True:
            batch: List[Dict[str, Any]] = []
            chars = 0
            with self._lock:
                while self._buffer and len(batch) < self.batch_records:
                    flat, size = self._buffer[0]
                    if batch and chars + size > self.batch_chars:
                        break
                    self._buffer.popleft()
                    batch.append(flat)
                    chars += size
                more = bool(self._buffer)
                dropped, replaced = self._dropped, self._replaced
            if not batch and not final and dropped == self._dropped_sent:
                break
            message = {
                "mplog": _FORMAT, "instance": self._instance, "seq": self._seq + 1,
                "worker": self._address, "dropped": dropped, "replaced": replaced,
                "final": bool(final and not more), "records": batch,
            }
            try:
                self._worker.log_event(self.topic, message)
                self._seq += 1  # only a batch that left counts: flush() waits for this number
                self._dropped_sent = dropped
            except Exception:
                with self._lock:
                    self._dropped += len(batch)  # counted, and reported by the next batch
            if not more:
                break
        return self._instance, self._seq


def _send_on_worker(name: str, dask_worker: Any = None) -> Optional[Tuple[str, int]]:
    """``Client.run`` target: send the plugin's buffer now; (instance, seq) or None."""
    plugin = getattr(dask_worker, "plugins", {}).get(name)
    if not isinstance(plugin, MplogWorkerPlugin) or getattr(plugin, "_handler", None) is None:
        return None
    return plugin.send()


# -- client side ---------------------------------------------------------------------------------
class _Malformed(ValueError):
    pass


_STR_FIELDS = {"name": MAX_NAME, "levelname": MAX_NAME, "pathname": MAX_NAME, "funcName": MAX_NAME,
               "processName": MAX_NAME, "threadName": MAX_NAME, "msg": MAX_TEXT + _CUT_SLACK}
_OPTIONAL_TEXT = {"exc_text": MAX_TEXT + _CUT_SLACK, "stack_info": MAX_TEXT + _CUT_SLACK}
_INT_FIELDS = ("levelno", "lineno", "process")
_RECORD_KEYS = frozenset(_STR_FIELDS) | frozenset(_OPTIONAL_TEXT) | frozenset(_INT_FIELDS) | {
    "created", "extras", "user"}
_RESERVED = frozenset(_STANDARD) | {WORKER_KEY, USER_MESSAGE_KEY}


def _check_str(value: Any, limit: int, what: str) -> str:
    if type(value) is not str:
        raise _Malformed(f"{what} is {type(value).__name__}, not str")
    if len(value) > limit:
        raise _Malformed(f"{what} has {len(value)} characters (at most {limit})")
    return value


def _check_int(value: Any, what: str) -> int:
    if type(value) is not int or not -_MAX_INT <= value <= _MAX_INT:
        raise _Malformed(f"{what} is not a 64-bit int")
    return value


def _rebuild(flat: Any, address: str) -> logging.LogRecord:
    """A LogRecord from a worker's dict, after checking every field; raises _Malformed."""
    if type(flat) is not dict:
        raise _Malformed(f"record is {type(flat).__name__}, not dict")
    unknown = flat.keys() - _RECORD_KEYS
    if unknown or len(flat) != len(_RECORD_KEYS):
        missing = _RECORD_KEYS - flat.keys()
        raise _Malformed(f"record fields: unknown {sorted(map(str, unknown))[:5]}, missing {sorted(missing)}")
    attrs: Dict[str, Any] = {}
    for key, limit in _STR_FIELDS.items():
        attrs[key] = _check_str(flat[key], limit, key)
    for key, limit in _OPTIONAL_TEXT.items():
        value = flat[key]
        attrs[key] = None if value is None else _check_str(value, limit, key)
    for key in _INT_FIELDS:
        attrs[key] = _check_int(flat[key], key)
    created = flat["created"]
    if type(created) not in (int, float) or not 0 <= created < 1e11:
        raise _Malformed("created is not a timestamp")
    if type(flat["user"]) is not bool:
        raise _Malformed("user is not a bool")
    extras = flat["extras"]
    if type(extras) is not dict or len(extras) > MAX_EXTRAS:
        raise _Malformed(f"extras is not a dict of at most {MAX_EXTRAS} items")
    for key, value in extras.items():
        _check_str(key, MAX_EXTRA_KEY, "an extra's key")
        _check_str(value, MAX_EXTRA_VALUE, f"extra {key!r}")
        if not key or key in _RESERVED:
            raise _Malformed(f"extra key {key!r} is reserved")
    attrs.update(extras)
    path = attrs["pathname"]
    base = os.path.basename(path)
    attrs["filename"] = base
    attrs["module"] = os.path.splitext(base)[0]
    attrs["args"] = None
    attrs["exc_info"] = None
    attrs["created"] = float(created)
    attrs["msecs"] = (created - int(created)) * 1000
    attrs["relativeCreated"] = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
    attrs["thread"] = None
    attrs[WORKER_KEY] = address
    if flat["user"]:
        attrs[USER_MESSAGE_KEY] = True
    return logging.makeLogRecord(attrs)


def _notice(levelno: int, msg: str, address: Optional[str] = None) -> logging.LogRecord:
    record = logging.LogRecord(PLACEHOLDER_LOGGER, levelno, __file__, 0, msg, None, None, "forward_dask_logs")
    if address is not None:
        setattr(record, WORKER_KEY, address)
    return record


def _truncate_topic_on_scheduler(topic: str) -> Any:
    # Defined inside a function so that cloudpickle sends it by value: the scheduler need not
    # have mplog installed.
    def truncate(dask_scheduler: Any = None) -> None:
        broker = getattr(dask_scheduler, "_broker", None)
        if broker is not None:
            broker.truncate(topic)
            return
        events = getattr(dask_scheduler, "events", None)  # before distributed 2023.9
        if events is not None and topic in events:
            events[topic].clear()

    return truncate


class _TopicHistory:
    """The scheduler's copy of the topic's events, cleared now and then: they are delivered."""

    def __init__(self, client: Any, topic: str) -> None:
        self.client = client
        self.topic = topic

    def clear(self) -> None:
        # The scheduler keeps the last events of every topic (distributed.admin.low-level-log-length,
        # 1000): ours are delivered already, so they need not sit in its memory.
        try:
            self.client.run_on_scheduler(_truncate_topic_on_scheduler(self.topic))
        except Exception:
            pass

    def clear_soon(self) -> None:
        # In the client's event loop: do not wait for the answer here.
        client = self.client
        run = getattr(client, "_run_on_scheduler", None)
        if run is None:
            return

        async def truncate() -> None:
            try:
                await run(_truncate_topic_on_scheduler(self.topic))
            except Exception:
                pass

        try:
            asyncio.get_running_loop().create_task(truncate())
        except Exception:
            pass


class _Receiver:
    """The subscription's event handler (in the client's event-loop thread): checks each batch,
    tracks every worker instance's sequence and counters, hands the records to the service."""

    def __init__(self, queue: Any, plugin: MplogWorkerPlugin, history: "_TopicHistory",
                 truncate_every: Callable[[], int]) -> None:
        self._queue = queue
        self.plugin = plugin
        self._history = history
        self._truncate_every = truncate_every
        self.lock = threading.Lock()
        self.instances: Dict[str, Dict[str, Any]] = {}
        self.counts = {"received": 0, "dropped_in_workers": 0, "malformed": 0, "replaced_in_workers": 0,
                       "batches": 0, "missing_batches": 0, "workers_ended_without_final": 0}
        self.probe: Optional[str] = None
        self.probe_seen = threading.Event()
        self._since_truncate = 0

    def on_event(self, event: Any) -> None:
        try:
            self._handle(event)
        except Exception as exc:  # never let a batch break the client's report loop
            self.put(_notice(logging.ERROR, f"mplog could not handle a Dask log event: {_describe(exc)}"))
            with self.lock:
                self.counts["malformed"] += 1

    def put(self, record: logging.LogRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except Exception:
            pass  # the channel counts and diverts its own failures

    def _malformed(self, reason: str, address: Optional[str], n: int = 1) -> None:
        with self.lock:
            self.counts["malformed"] += n
        origin = f"Dask worker {address}" if address else "Dask"
        self.put(_notice(logging.WARNING, f"malformed log record(s) from {origin} replaced: {reason}", address))

    def _handle(self, event: Any) -> None:
        if not isinstance(event, (tuple, list)) or len(event) != 2:
            self._malformed("an event that is not (time, message)", None)
            return
        msg = event[1]
        if type(msg) is dict and "mplog_probe" in msg and len(msg) == 1:
            if msg["mplog_probe"] == self.probe:
                self.probe_seen.set()
            return
        address = msg.get("worker") if type(msg) is dict else None
        if type(address) is not str or not 0 < len(address) <= MAX_ADDRESS:
            self._malformed("a batch without a worker address", None)
            return
        try:
            instance, seq, final, records, dropped, replaced = self._check_batch(msg)
        except _Malformed as exc:
            self._malformed(f"batch: {exc}", address)
            return
        with self.lock:
            state = self.instances.get(instance)
            if state is None:
                state = self.instances[instance] = {"worker": address, "seq": 0, "dropped": 0,
                                                     "replaced": 0, "final": False, "reported": False}
            if seq <= state["seq"]:
                return  # a batch seen before
            self.counts["missing_batches"] += seq - state["seq"] - 1
            state["seq"] = seq
            new_drops = max(0, dropped - state["dropped"])
            state["dropped"] = max(state["dropped"], dropped)
            self.counts["dropped_in_workers"] += new_drops
            self.counts["replaced_in_workers"] += max(0, replaced - state["replaced"])
            state["replaced"] = max(state["replaced"], replaced)
            state["final"] = state["final"] or final
            self.counts["batches"] += 1
            self._since_truncate += 1
            truncate = self._since_truncate >= self._truncate_every()
            if truncate:
                self._since_truncate = 0
        if new_drops:
            self.put(_notice(logging.WARNING, f"{new_drops} record(s) dropped in Dask worker {address}: its "
                                              f"buffer of {self.plugin.max_buffer} records was full", address))
        good = 0
        for flat in records:
            try:
                record = _rebuild(flat, address)
            except _Malformed as exc:
                self._malformed(str(exc), address)
                continue
            self.put(record)
            good += 1
        with self.lock:
            self.counts["received"] += good
        if truncate:
            self._history.clear_soon()

    @staticmethod
    def _check_batch(msg: Dict[str, Any]) -> Tuple[str, int, bool, Any, int, int]:
        if msg.get("mplog") != _FORMAT:
            raise _Malformed("not an mplog batch of a known format")
        instance = _check_str(msg.get("instance"), 64, "instance")
        seq = _check_int(msg.get("seq"), "seq")
        dropped = _check_int(msg.get("dropped"), "dropped")
        replaced = _check_int(msg.get("replaced"), "replaced")
        final = msg.get("final")
        records = msg.get("records")
        if seq < 1 or dropped < 0 or replaced < 0 or type(final) is not bool:
            raise _Malformed("bad seq, counters or final flag")
        if not isinstance(records, (list, tuple)) or len(records) > MAX_BATCH_RECORDS:
            raise _Malformed(f"records is not a list of at most {MAX_BATCH_RECORDS}")
        return instance, seq, final, records, dropped, replaced

    def report_ended(self, current: Any) -> None:
        """Workers gone without a final batch (killed): say so, once each."""
        ended = []
        with self.lock:
            for state in self.instances.values():
                if not state["final"] and not state["reported"] and state["worker"] not in current:
                    state["reported"] = True
                    self.counts["workers_ended_without_final"] += 1
                    ended.append(state["worker"])
        for address in ended:
            self.put(_notice(logging.WARNING, f"Dask worker {address} ended without its final log batch "
                                              f"(killed?): records it logged in its last "
                                              f"{self.plugin.interval:g} s may be lost, uncounted", address))


class DaskLogForwarder:
    """What ``forward_dask_logs`` returns: the subscription and the plugin, their counters,
    ``flush()`` and ``close()`` (also a context manager)."""

    #: Every this many batches, the scheduler's copy of the topic's events is cleared.
    truncate_every = 200

    def __init__(self, client: Any, svc: Any, plugin: MplogWorkerPlugin) -> None:
        self.client = client
        self.svc = svc
        self.plugin = plugin
        self.topic = plugin.topic
        self._history = _TopicHistory(client, self.topic)
        self._receiver = _Receiver(svc.queue,  # raises if the service is not started
                                   plugin, self._history, lambda: self.truncate_every)
        self._closed = False

    # -- public --------------------------------------------------------------------------------
    @property
    def counts(self) -> Dict[str, int]:
        """``received`` (records handed to the service), ``dropped_in_workers`` (buffers full),
        ``malformed`` (records or batches replaced by a placeholder), ``replaced_in_workers``
        (placeholders made while flattening), ``batches``, ``missing_batches`` (gaps in a
        worker's sequence), ``workers_ended_without_final`` (killed workers: their last
        records may be lost, uncounted)."""
        with self._receiver.lock:
            return dict(self._receiver.counts)

    def flush(self, timeout: float = 10.0) -> bool:
        """Ask every worker to send its buffer now, wait until the client has received it, then
        ``svc.flush()``. True once every record logged in a worker before this call is in the
        files. Also reports workers that ended without their final batch."""
        deadline = time.monotonic() + timeout
        try:
            sent = self.client.run(_send_on_worker, self.plugin.name, on_error="return")
        except TypeError:  # distributed < 2024.2 has no on_error
            try:
                sent = self.client.run(_send_on_worker, self.plugin.name)
            except Exception:
                return False
        except Exception:
            return False
        # None: the plugin is not (yet, or any more) on that worker, so it holds nothing to send.
        wanted = {result[0]: result[1] for result in sent.values()
                  if isinstance(result, tuple) and len(result) == 2}
        failed = any(result is not None and not isinstance(result, tuple) for result in sent.values())
        while True:
            with self._receiver.lock:
                behind = [i for i, seq in wanted.items() if self._receiver.instances.get(i, {}).get("seq", 0) < seq]
            if not behind or time.monotonic() > deadline:
                break
            time.sleep(0.005)  # a deadline loop on the counters the event handler updates
        self._receiver.report_ended(set(sent))
        self._history.clear()
        if behind:
            return False
        return self.svc.flush(max(0.0, deadline - time.monotonic())) and not failed

    def close(self, timeout: float = 10.0) -> Dict[str, int]:
        """Unregister the plugin (each worker removes its handler and sends what is left), wait
        for those final batches, unsubscribe. Idempotent. Returns ``counts``."""
        if self._closed:
            return self.counts
        self._closed = True
        deadline = time.monotonic() + timeout
        addresses: List[str] = []
        try:
            responses = self.client.unregister_worker_plugin(self.plugin.name)
            if isinstance(responses, dict):
                addresses = [a for a, r in responses.items() if isinstance(r, dict) and r.get("status") == "OK"]
        except ValueError:
            pass  # not registered any more (a restarted scheduler): nothing to wait for
        except Exception:
            # A teardown failed somewhere; the others ran. Wait for what the live workers send.
            try:
                addresses = list(self.client.scheduler_info().get("workers", {}))
            except Exception:
                addresses = []
        while addresses and time.monotonic() < deadline:
            with self._receiver.lock:
                finished = {v["worker"] for v in self._receiver.instances.values() if v["final"]}
            addresses = [a for a in addresses if a not in finished]
            if addresses:
                time.sleep(0.005)  # a deadline loop on the final batches
        try:
            current = set(self.client.scheduler_info().get("workers", {}))
        except Exception:
            current = None
        if current is not None:
            self._receiver.report_ended(current)
        self._history.clear()
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:
            pass
        return self.counts

    def __enter__(self) -> "DaskLogForwarder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DaskLogForwarder topic={self.topic!r} {self.counts}>"

    # -- set-up ----------------------------------------------------------------------------------
    def _start(self, timeout: float) -> None:
        self.client.subscribe_topic(self.topic, self._receiver.on_event)
        # The subscription travels on the client's batched stream, the probe by RPC: wait until
        # a probe comes back, so nothing a worker sends after registration is missed.
        deadline = time.monotonic() + timeout
        while True:
            self._receiver.probe = uuid.uuid4().hex
            self._receiver.probe_seen.clear()
            self.client.log_event(self.topic, {"mplog_probe": self._receiver.probe})
            if self._receiver.probe_seen.wait(min(0.5, max(0.01, deadline - time.monotonic()))):
                break
            if time.monotonic() > deadline:
                self.client.unsubscribe_topic(self.topic)
                raise TimeoutError(f"the subscription to Dask topic {self.topic!r} was not confirmed "
                                   f"within {timeout} s")
        register = getattr(self.client, "register_plugin", None)
        if register is None:  # distributed < 2023.9
            register = self.client.register_worker_plugin
        try:
            register(self.plugin, name=self.plugin.name)
        except BaseException:
            try:
                self.client.unsubscribe_topic(self.topic)
            except Exception:
                pass
            raise



def forward_dask_logs(client: Any, svc: Any, topic: str = "mplog", level: Union[int, str, None] = None,
                      interval: float = 0.1, max_buffer: int = 10000, batch_records: int = 500,
                      timeout: float = 30.0) -> DaskLogForwarder:
    """Send what Dask tasks log, on every current and future worker of ``client``'s cluster, to
    ``svc`` (a started ``LogService``), with the worker's address in each record's Context as
    ``dask_worker``.

    ``level``: the workers' handler level (default: the service's ``level``). ``interval``:
    seconds between a worker's sends. ``max_buffer``: records a worker holds while it cannot
    send; beyond it they are dropped and counted. ``topic`` names the Dask event topic (one
    forwarder per topic and client). Returns a ``DaskLogForwarder``; ``close()`` (or leaving its
    ``with`` block) undoes it.
    """
    if getattr(client, "asynchronous", False):
        raise TypeError("forward_dask_logs needs a synchronous Client")
    chosen = svc.config.level if level is None else level
    plugin = MplogWorkerPlugin(topic=topic, level=chosen, interval=interval, max_buffer=max_buffer,
                               batch_records=batch_records)
    forwarder = DaskLogForwarder(client, svc, plugin)
    forwarder._start(timeout)
    return forwarder
