"""This process's channel into one service: the record path from a payload to its ring.

``SpoolHandler`` (``handler``) makes a record's payload; everything after is here:

- ``Channel``: the record path (the compiled ring's ``publish`` first, else the Python path
  under the slot's lock), and the ``context`` fields it adds to a record.
- ``Attachment``, its base: what this process holds of the service (its slot of the counters,
  its ring and the ring's opening, ENOSPC being a full ring), claimed lazily and again after a
  fork, let go when the service stops; and what the ring says (``wait_written``, ``backlog``).
  A base, not a member, so that ``publish``/``publish_record`` stay plain attributes of the
  channel, read by ``SpoolHandler.handle`` on every record without an indirection.
- ``Overflow``: the policy for a record the ring has no room for, and its episode.
- ``StderrDivert``: a record's line on stderr when it cannot go to the files (made from the
  LogRecord and its formatter's text, never by decoding the payload), and the summary of drops.
- ``Doorbell``: the wake-up frame on the control FIFO, when the listener sleeps.

One module, not one per class: a forked worker imports it, and each module costs its import.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from . import process as _process
from .._common.counters import (FIELDS, OVERFLOW_SLOT, S_DIVERTED, S_DROPPED, S_ERRORS, S_REPLACED, S_RING, S_SENT,
                                STATE_STOPPED, Counters, Slot)
from .._common.record import COMMON_KEYS, LEAN_KEYS, TAG_COMMON, Record, common_payload, flatten, serialize
from .._common.spool import _NO_ROOM, W_DONE, RingWriter, _process_start, open_ring_writer, ring_capacity
from .._common.transport import K_WAKE, FifoWriter
from .._common.worker_config import WorkerConfig

__all__ = ["Channel", "Attachment", "Overflow", "StderrDivert", "Doorbell", "context", "current_context", "SLEEPING"]

SLEEPING = FIELDS.index("sleeping")  # the listener's "every ring was empty" word of the counters
# publish() needs the GIL (see Channel.put_payload); a free-threaded build takes the Python path.
_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()
if TYPE_CHECKING:
    # One record on the Python path: (payload, placeholders used, the LogRecord, the text a
    # formatter made of it). The record and the text, not the payload, make a line on stderr.
    _Put = Tuple[bytes, int, logging.LogRecord, Optional[str]]


_context: contextvars.ContextVar[Optional[Dict[str, Any]]] = contextvars.ContextVar("mplog_context", default=None)
current_context = _context.get  # the fields of the innermost ``context`` block, or None


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


class Doorbell:
    """One process's writer of wake-up frames on the control FIFO, opened on first use."""

    def __init__(self, fifo_path: str) -> None:
        self.fifo_path = fifo_path
        self._writer: Optional[FifoWriter] = None

    def ring(self) -> None:
        """Wake the listener; never raises (no listener: it scans the rings when it starts)."""
        writer = self._writer
        if writer is None:
            try:
                writer = self._writer = FifoWriter(self.fifo_path)
            except OSError:
                return
        try:
            writer.write_record(K_WAKE, b"", 0.0)
        except OSError:
            pass

    def wake(self, words: Any) -> None:
        """The listener sleeps (``words`` are the counters'): clear its flag, then ring once."""
        words[SLEEPING] = 0
        self.ring()

    def after_fork(self) -> None:
        # The writer's frames name their process: a forked child's are its own.
        if self._writer is not None:
            self._writer.pid = os.getpid()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Overflow:
    """The policy of one channel, and the state of its current episode of a full ring."""

    def __init__(self, policy: str, timeout: float) -> None:
        self.policy = policy
        self.timeout = timeout
        # overflow="timeout": this episode's one wait is spent; records drop without waiting
        # (and the compiled publish() stays held, see Channel._unhold) until one fits again.
        self.episode = False

    def room_again(self) -> None:
        """A record fitted: the next full ring may wait once more."""
        self.episode = False

    def wait(self, write: Callable[[], bool], words: Any, bell: Callable[[], None]) -> Optional[bool]:
        """The ring is full (or has no room to be made). ``write`` tries again; ``words`` are
        the counters' (the service's state); ``bell`` wakes the listener. True: written after a
        wait; False: drop; None: the service is gone."""
        policy = self.policy
        if policy == "drop" or policy == "stderr":
            return False
        if policy == "timeout":
            if self.episode:  # one wait per overflow episode, then drops without waiting
                return False
            deadline: Optional[float] = time.monotonic() + self.timeout
        else:
            deadline = None
        bell()
        pause = 0.0002
        while True:
            if write():
                return True
            if words[1] == STATE_STOPPED:
                return None
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.episode = True
                return False
            left = 0.01 if deadline is None else max(0.0, deadline - now)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.01)


def stderr_line(record: logging.LogRecord, message: Optional[str] = None) -> str:
    """``record``'s line in the simplified log, as the listener would write it. ``message``:
    the text a formatter set on the handler made of it."""
    # Lazily: a worker that never diverts never loads the listener's formatting.
    from .._common.format import SimplifiedFormatter
    fields, _ = flatten(record, None, message)
    return SimplifiedFormatter().format(Record._make(fields))


class StderrDivert:
    """One channel's lines on stderr: diverted records, and the summary of its drops."""

    def __init__(self, overflow: str) -> None:
        self.overflow = overflow  # named in the summary of drops for want of room
        self._drops_unreported = 0
        self._last_notice = 0.0

    def record(self, record: logging.LogRecord, message: Optional[str], prefix: str) -> None:
        """Print ``record``'s line after ``prefix`` (``[DROPPED] ``, ``[UNDELIVERED] ``, or
        nothing); never raises: stderr itself may be gone, and the record is counted already."""
        try:
            data = (prefix + stderr_line(record, message)).encode("utf-8", "backslashreplace")
            os.write(_process.err_fd(), data)
        except Exception:
            pass

    def note_drop(self, why: str = "") -> None:
        """One drop more; said in one summary a second per process, never a line per record.
        ``why`` (an internal error) is said at once."""
        self._drops_unreported += 1
        now = time.monotonic()
        if now - self._last_notice >= 1.0 or why:
            n, self._drops_unreported = self._drops_unreported, 0
            self._last_notice = now
            reason = why or f"the log spool is full (overflow={self.overflow!r})"
            msg = f"mplog: {n} record(s) dropped by process {os.getpid()}: {reason}\n"
            try:
                os.write(_process.err_fd(), msg.encode("utf-8", "backslashreplace"))
            except OSError:
                pass


class Attachment:
    """What this process holds of one service, claimed lazily and again after a fork."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._pid = -1
        self._counters: Optional[Counters] = None
        self._slot: Optional[Slot] = None
        self._ring: Optional[RingWriter] = None
        self._no_room = False  # the ring could not be made for want of room: a full ring
        # The compiled ring's publish(), which does the hot path in one call without the lock
        # (see Channel.put_payload), or None: Python's path only. Plain attributes, read by
        # SpoolHandler.handle on every record.
        self._publish: Optional[Callable[[bytes], int]] = None
        self._publish_record: Optional[Callable[[Dict[str, Any]], int]] = None  # the same, from the record's dict
        self._doorbell = Doorbell(config.fifo_path)
        self._closed = False  # the service stopped and close() let its spool go (see close)

    def _attach(self) -> Counters:
        # Lazily, and again after a fork: a child must not share its parent's slot or ring.
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "the log service has stopped", self.config.counters_path)
        pid = os.getpid()
        if self._pid != pid or self._counters is None:
            if self._counters is None:
                self._counters = Counters.open(self.config.counters_path)
            slot = self._slot = self._counters.claim_slot(pid, _process_start(pid), _process.process_name(),
                                                          os.getppid())
            self._ring = None  # a forked child's copy of the parent's ring is not its own
            self._publish = self._publish_record = None
            self._pid = pid
            if pid != self.config.owner_pid:
                # Once per process: leave what tells the listener how it ends (see _process),
                # and ring, so that the listener watches it from now, not from its next look.
                _process.watch(slot, os.path.dirname(self.config.counters_path), self.config.capture_output)
                self._doorbell.ring()
        return self._counters

    def after_fork(self) -> None:
        # A thread of the parent may have held the slot's lock at fork(): the child claims a
        # slot (and a lock) of its own on first use.
        self._slot = None
        self._pid = -1
        self._ring = None
        self._publish = self._publish_record = None
        self._doorbell.after_fork()

    def _open_ring(self, slot: Slot) -> Optional[RingWriter]:
        cfg = self.config
        if slot.index == OVERFLOW_SLOT:
            # Shared by every process that found no slot: no ring of its own, and no wait for
            # room that would never come. The records go to stderr, counted as diverted.
            self._no_room = False
            return None
        path = os.path.join(os.path.dirname(cfg.counters_path), f"ring.{slot.index}")
        try:
            ring = open_ring_writer(path, cfg.ring_bytes or ring_capacity(cfg.queue_size), cfg.queue_size)
        except OSError as exc:
            # No room for even its header (ENOSPC): a full ring, the overflow policy's; the
            # spool gone (the service stopped): the caller diverts.
            self._no_room = exc.errno in _NO_ROOM
            return None
        slot.set(S_RING, 1)
        self._ring = ring
        if ring._compiled and _GIL:
            # publish() holds the counters' words; _attach_words sets _hold, and the Python
            # path that opens the ring clears it when it lets the ring go.
            keys = LEAN_KEYS if cfg.lean else COMMON_KEYS  # the handler's _fields
            ring._attach_words(slot.words, 1, slot.base + S_SENT, SLEEPING, STATE_STOPPED,  # type: ignore[attr-defined]
                               keys, TAG_COMMON)
            self._publish = ring.publish  # type: ignore[attr-defined]
            self._publish_record = ring.publish_record  # type: ignore[attr-defined]
        self._doorbell.ring()  # a new ring: the listener learns of it now, not at its next scan
        return ring

    def stopped(self) -> bool:
        """True once the service has stopped (its listener wrote the stop summary)."""
        counters = self._counters
        return self._closed or (counters is not None and counters.words[1] == STATE_STOPPED)

    def close(self) -> None:
        """Let go of the doorbell, the ring and the counters (the service has stopped): each
        mapping holds a descriptor, and a notebook that runs a service per cell ran out of them
        (issue 29). A record put after this goes to stderr (``Channel._put_locked``)."""
        slot = self._slot
        # No thread of this process may be inside the Python path's ring write when the ring is
        # unmapped. One that will not let go (it cannot, the service has stopped: a bound
        # anyway) keeps the mappings: a leak, not a crash.
        held = slot is None or slot.lock.acquire(timeout=1.0)
        try:
            self._closed = True
            self._publish = self._publish_record = None
            ring, self._ring = self._ring, None
            counters, self._counters = self._counters, None
            self._slot = None
            if ring is not None and held:
                ring.close()  # first: the compiled ring holds a view of the counters' words
            if counters is not None and held:
                counters.close()
            self._doorbell.close()
        finally:
            if slot is not None and held:
                slot.lock.release()

    # -- what the ring says -------------------------------------------------------------
    def wait_written(self, timeout: float) -> bool:
        """Wait until every record this process published is in the files (its ring's tail has
        passed them), at most ``timeout`` seconds. What ``handler.flush()`` means here."""
        ring = self._ring
        counters = self._counters
        if ring is None or counters is None or self._pid != os.getpid():
            return True
        target = ring._seq
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while ring.words[W_DONE] < target:
            if counters.words[1] == STATE_STOPPED or time.monotonic() >= deadline:
                return ring.words[W_DONE] >= target
            time.sleep(pause)  # a deadline loop on the listener's commit
            pause = min(pause * 2, 0.01)
        return True

    def backlog(self) -> int:
        """Records of the whole service published and not yet written."""
        counters = self._attach()
        t = counters.slot_totals()
        published = t["sent"] - t["dropped"] - t["diverted"]
        return max(0, published - counters.get("written") - counters.get("stderr_records") - counters.get("torn"))

    def full(self) -> bool:
        ring = self._ring
        return ring is not None and not ring.room()


class Channel(Attachment):
    """This process's record path into one service: a payload into its ring (the compiled
    ``publish`` first, else the Python path under the slot's lock), the overflow policy when
    the ring is full, stderr when the service is gone. ``Attachment`` holds the slot and ring.

    Quacks like a queue for the standard library: ``QueueHandler(svc.queue)`` works, because
    ``put_nowait`` accepts a LogRecord.
    """

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        # The slot's lock is re-entrant: a signal handler that logs while this thread is inside
        # put_payload must not deadlock; it finds ``_busy`` set and defers its record.
        self._busy = False
        self._deferred: List[_Put] = []
        self._overflow = Overflow(config.overflow, config.overflow_timeout)
        self._stderr = StderrDivert(config.overflow)
        # Set once ``svc.queue`` is used in this process: from then on a record that reaches
        # both mplog's handler and a QueueHandler on that queue is sent once (see seen_before).
        self.dedupe = False
        self._last_key: Dict[int, Tuple[float, int, str]] = {}

    def seen_before(self, record: logging.LogRecord) -> bool:
        """True if this thread's previous record sent here was this same record (the original
        and a QueueHandler's copy of it share their creation time, line and logger)."""
        key = (record.created, record.lineno, record.name)
        ident = threading.get_ident()
        if self._last_key.get(ident) == key:
            return True
        if len(self._last_key) > 1024:
            self._last_key.clear()
        self._last_key[ident] = key
        return False

    def prepare(self, record: logging.LogRecord, message: Optional[str] = None) -> Tuple[bytes, int]:
        """The record as a payload of plain fields, for the listener to format."""
        context = current_context()
        if message is None and context is None:
            payload = common_payload(record, self.config.lean)
            if payload is not None:
                return payload, 0
        return serialize(record, context, message)

    def after_fork(self) -> None:
        super().after_fork()
        self._busy = False
        self._deferred = []

    @contextlib.contextmanager
    def quiesced(self, timeout: float) -> Iterator[bool]:
        """While the block runs, no thread of this process is between reading the service's
        state and publishing: the Python path waits for the slot's lock, publish() is held off
        (it then takes the Python path). The service holds this while its listener stops, so
        the listener need not wait for this process's records in flight. Yields False if the
        lock could not be had within ``timeout`` (a thread waits for room in a full ring)."""
        slot = self._slot
        if slot is None or self._pid != os.getpid():
            yield True
            return
        if not slot.lock.acquire(timeout=max(0.0, timeout)):
            yield False
            return
        try:
            self._hold()
            yield True
        finally:
            self._unhold()
            slot.lock.release()

    # -- the record path ------------------------------------------------------------------
    def put_nowait(self, record: logging.LogRecord) -> None:
        """Standard-library ``QueueHandler`` entry point."""
        payload, failures = self.prepare(record)
        self.put_payload(payload, record, failures)

    put = put_nowait

    def put_payload(self, payload: bytes, record: logging.LogRecord, failures: int = 0,
                    message: Optional[str] = None) -> None:
        """Publish ``payload``, made of ``record`` (and of ``message``, the text a formatter
        made of it): the record and the text are what a line on stderr is made of, if it
        comes to that, so the payload is never decoded here."""
        publish = self._publish
        if publish is not None and not failures:
            # The hot path in one C call, without the lock: check the service's state, copy the
            # entry into the ring, count it sent, read the listener's sleeping flag. With the GIL
            # it runs whole between two bytecodes of any other thread or signal handler, so it
            # needs no lock as long as it stays off the ring while the Python path below has it
            # (_hold). 0: not done (stopped, full, big, held): the Python path does it all.
            done = publish(payload)
            if done:
                if done == 2:
                    self._wake_locked()
                return
        self._put_locked((payload, failures, record, message))

    def _wake_locked(self) -> None:
        slot = self._slot
        assert slot is not None
        with slot.lock:
            self._wake()

    def _put_locked(self, put: _Put) -> None:
        """put_payload's Python path, under the slot's lock: anything publish() does not do."""
        payload, failures, record, message = put
        slot = self._slot
        if slot is None:  # first use, or first use after a fork (after_fork forgets the slot)
            if self._closed:  # the service has stopped: as _put says it, a plain line
                self._stderr.record(record, message, "")
                return
            try:
                self._attach()
            except OSError:
                self._stderr.record(record, message, "[UNDELIVERED] ")
                return
            slot = self._slot
            assert slot is not None
        with slot.lock:
            if self._closed:  # close() ran while this thread waited for the lock
                self._stderr.record(record, message, "")
                return
            if self._busy:  # a signal handler, inside this thread's own put: publish it after
                self._deferred.append(put)
                return
            self._busy = True
            self._hold()
            try:
                ring = self._ring
                words = slot.words
                # publish()'s case, where it is not there (pure Python, a free-threaded build)
                # or was held: the service runs, the ring has room, the listener is awake.
                # Anything else (full, a big record's file not written, no ring yet, stopped)
                # is _put's, which tries the ring once more.
                ok = False
                if ring is not None and not failures and words[1] != STATE_STOPPED and not self._overflow.episode:
                    try:
                        ok = ring.write(payload)
                    except OSError:
                        pass
                if ok:
                    words[slot.base + S_SENT] += 1
                    if words[SLEEPING]:
                        self._wake()
                else:
                    self._put(slot, put)
                while self._deferred:
                    self._put(slot, self._deferred.pop(0))
            finally:
                self._busy = False
                self._unhold()

    def _hold(self, on: int = 1) -> None:
        """Keep publish() off the ring and the counters (``on``), or let it back. The caller
        holds the slot's lock."""
        if self._publish is not None:
            self._ring._hold = on  # type: ignore[union-attr]

    def _unhold(self) -> None:
        # Still held inside an outer put (a signal handler's record), and through an overflow
        # episode (overflow="timeout"), which ends on the Python path.
        self._hold(1 if self._busy or self._overflow.episode else 0)

    def _put(self, slot: Slot, put: _Put) -> None:
        payload, failures = put[0], put[1]
        words, base = slot.words, slot.base
        if failures:
            words[base + S_REPLACED] += failures
        if words[1] == STATE_STOPPED:  # the service is gone: tell the user rather than lose it
            self._divert(slot, put)
            return
        ring = self._ring
        if ring is None:
            ring = self._open_ring(slot)
            if ring is None:
                if not self._no_room:
                    self._divert(slot, put)
                    return
                ok: Optional[bool] = self._wait_for_room(lambda: self._write_new_ring(slot, payload))
                if ok is None:
                    self._divert(slot, put)
                    return
                self._count_put(slot, ok, put)
                return
        try:
            ok = ring.write(payload)
        except OSError:  # a big record's own file could not be written (not for room: EACCES...)
            self._divert(slot, put)
            return
        if not ok:
            ok = self._wait_for_room(lambda: ring.write(payload))
            if ok is None:
                self._divert(slot, put)
                return
        self._count_put(slot, ok, put)

    def _write_new_ring(self, slot: Slot, payload: bytes) -> bool:
        """A record for a ring that had no room to be made: make it now, if there is room."""
        ring = self._ring or self._open_ring(slot)
        return ring is not None and ring.write(payload)

    def _wait_for_room(self, write: Callable[[], bool]) -> Optional[bool]:
        counters = self._counters
        assert counters is not None
        return self._overflow.wait(write, counters.words, self._doorbell.ring)

    def _count_put(self, slot: Slot, ok: bool, put: _Put) -> None:
        words, base = slot.words, slot.base
        if ok:
            words[base + S_SENT] += 1
            self._overflow.room_again()
            if words[SLEEPING]:
                self._wake()
            return
        words[base + S_DROPPED] += 1
        words[base + S_SENT] += 1
        if self.config.overflow == "stderr":
            self._stderr.record(put[2], put[3], "[DROPPED] ")
        else:
            self._stderr.note_drop()

    def _wake(self) -> None:
        counters = self._counters
        assert counters is not None
        self._doorbell.wake(counters.words)

    def _divert(self, slot: Slot, put: _Put) -> None:
        slot.count(S_SENT, S_DIVERTED)
        self._stderr.record(put[2], put[3], "")

    def count_error(self, exc: BaseException) -> None:
        """An unexpected failure in mplog's own code: counted as an error and a drop, said once
        a second on stderr."""
        try:
            self._attach()
            slot = self._slot
            assert slot is not None
            with slot.lock:
                self._hold()  # the sent counter is publish()'s too
                try:
                    slot.count(S_SENT, S_DROPPED, S_ERRORS)
                finally:
                    self._unhold()
            self._stderr.note_drop(f"internal error {type(exc).__name__}: {exc}")
        except Exception:
            pass
