"""The transport: a kernel FIFO carrying self-checking frames, written without any lock.

Why not ``multiprocessing.Queue``: its ``get()`` waits holding a cross-process lock, and its
writers hold another one while writing a frame that may exceed the pipe's atomic size. A SIGKILL
at either point wedges every other process for good (cpython #87971, #96062; FIELD-NOTES).

What we do instead:

* Every frame is at most ``PIPE_BUF`` bytes and goes to the pipe in **one** ``write()``. POSIX
  makes such writes atomic, so frames from different processes never interleave and no lock is
  needed. A record bigger than one frame is cut into FIRST/MORE/LAST chunks tagged with the
  writer's (pid, thread id, sequence); the reader reassembles each stream separately, so a writer
  killed between two chunks leaves an incomplete stream that the reader counts as *torn* and
  drops, without touching anyone else's records.
* The writer's file descriptor is non-blocking; a full pipe is an ``EAGAIN`` that the overflow
  policy decides on (wait with ``poll``, drop and count, or divert to stderr). There is no buffer
  in the worker: a record is in the kernel when the logging call returns, so a worker killed right
  after it (``Pool.terminate()``) loses nothing.
* Frames start with a magic number and carry a CRC-32, so a reader that meets bytes it did not
  expect (a buggy writer, the tail of a frame whose head a killed listener consumed) skips to the
  next valid frame and counts what it skipped, instead of desynchronising.
* The FIFO is opened by path, so a ``WorkerConfig`` is plain data that pickles under every start
  method, and a listener restarted after a kill opens the same channel with its backlog intact.
"""

from __future__ import annotations

import itertools
import os
import select
import struct
import time
import zlib
from threading import get_ident
from typing import Callable, Dict, List, Optional, Tuple
from zlib import crc32

__all__ = [
    "FRAME_MAX", "PAYLOAD_MAX", "K_RECORD", "K_FIRST", "K_MORE", "K_LAST", "K_FLUSH", "K_STOP",
    "K_REOPEN", "K_NOTICE", "K_WAKE", "encode_frames", "FrameParser", "FifoWriter", "set_pipe_size",
]

try:
    PIPE_BUF = select.PIPE_BUF
except AttributeError:  # pragma: no cover - not POSIX
    PIPE_BUF = 512

MAGIC = b"\xd3\x6c"  # arbitrary; two bytes that are not printable ASCII nor common in UTF-8 text
# magic(2) crc32(4) | kind(1) flags(1) length(2) pid(4) tid(4) seq(4): the CRC covers from kind on.
_HEAD = struct.Struct("<2sI")
_TAIL = struct.Struct("<BBHIII")
_WHOLE = struct.Struct("<2sIBBHIII")  # both, for the reader: one unpack per frame
HEADER_SIZE = _HEAD.size + _TAIL.size  # 22
FRAME_MAX = min(PIPE_BUF, 4096)
PAYLOAD_MAX = FRAME_MAX - HEADER_SIZE

K_RECORD, K_FIRST, K_MORE, K_LAST = 1, 2, 3, 4  # a record in one frame, or in chunks
K_FLUSH, K_STOP, K_REOPEN, K_NOTICE = 10, 11, 12, 13  # control, written by the main process
K_WAKE = 14  # the spool's doorbell: a ring has records and the listener was asleep
_KINDS = frozenset((K_RECORD, K_FIRST, K_MORE, K_LAST, K_FLUSH, K_STOP, K_REOPEN, K_NOTICE, K_WAKE))

F_SETPIPE_SZ = getattr(__import__("fcntl"), "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(__import__("fcntl"), "F_GETPIPE_SZ", 1032)


def _frame(kind: int, pid: int, tid: int, seq: int, payload: bytes) -> bytes:
    tail = _TAIL.pack(kind, 0, len(payload), pid, tid, seq)
    return _HEAD.pack(MAGIC, crc32(payload, crc32(tail))) + tail + payload


def encode_frames(kind: int, pid: int, tid: int, seq: int, payload: bytes) -> List[bytes]:
    """Cut ``payload`` into frames of at most ``FRAME_MAX`` bytes, each written with one write()."""
    if len(payload) <= PAYLOAD_MAX:
        return [_frame(kind, pid, tid, seq, payload)]
    view = memoryview(payload)
    cuts = range(0, len(payload), PAYLOAD_MAX)
    frames = []
    last = cuts[-1]
    for start in cuts:
        part = bytes(view[start:start + PAYLOAD_MAX])
        chunk_kind = K_FIRST if start == 0 else (K_LAST if start == last else K_MORE)
        frames.append(_frame(chunk_kind, pid, tid, seq, part))
    return frames


class FrameParser:
    """Turn a byte stream of frames back into messages, surviving garbage and torn streams.

    ``feed(data)`` returns complete messages as ``(kind, pid, tid, seq, payload)``. Counters:
    ``malformed`` (resynchronisations: bytes that were not a valid frame were skipped),
    ``skipped_bytes``, and ``torn`` (chunked records that can never complete: their writer died,
    or a previous reader consumed part of them). Memory held for partial streams is bounded by
    the records in flight, and ``expire()`` releases streams whose writer is gone.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._streams: Dict[Tuple[int, int, int], Tuple[List[bytes], float]] = {}
        self._orphans: Dict[Tuple[int, int, int], None] = {}  # broken records already counted
        self.malformed = 0
        self.skipped_bytes = 0
        self._in_garbage = False
        self.torn = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame at the end of what was fed (for the reader to finish)."""
        buf = self._buf
        if len(buf) < HEADER_SIZE or buf[:2] != MAGIC:
            return 0
        length = _TAIL.unpack_from(buf, 6)[2]
        if length > PAYLOAD_MAX:
            return 0
        return max(0, HEADER_SIZE + length - len(buf))

    def partial_streams(self) -> int:
        return len(self._streams)

    def feed(self, data: bytes) -> List[Tuple[int, int, int, int, bytes]]:
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
        view = memoryview(data)  # zero-copy slices for the CRC
        out: List[Tuple[int, int, int, int, bytes]] = []
        append = out.append
        pos = 0
        end = len(data)
        unpack = _WHOLE.unpack_from
        crc32 = zlib.crc32
        while end - pos >= HEADER_SIZE:
            magic, crc, kind, _flags, length, pid, tid, seq = unpack(data, pos)
            if magic != MAGIC:
                nxt = data.find(MAGIC, pos + 1)
                skip_to = nxt if nxt >= 0 else max(pos + 1, end - 1)
                self._skip(skip_to - pos)
                pos = skip_to
                continue
            if length > PAYLOAD_MAX or kind not in _KINDS:
                self._skip(1)
                pos += 1
                continue
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break  # incomplete: wait for more bytes
            if crc32(view[pos + 6:stop]) != crc:
                self._skip(1)
                pos += 1
                continue
            payload = data[pos + HEADER_SIZE:stop]
            pos = stop
            self._in_garbage = False
            if kind == K_RECORD or kind >= K_FLUSH:
                append((kind, pid, tid, seq, payload))
            else:
                done = self._chunk(kind, pid, tid, seq, payload)
                if done is not None:
                    append((K_RECORD, pid, tid, seq, done))
        view.release()
        self._buf = bytearray(data[pos:]) if pos < end else bytearray()
        return out

    def _skip(self, n: int) -> None:
        # One run of garbage is one malformed frame, however many bytes it takes to resync.
        if n <= 0:
            return
        if not self._in_garbage:
            self.malformed += 1
            self._in_garbage = True
        self.skipped_bytes += n

    def _chunk(self, kind: int, pid: int, tid: int, seq: int, payload: bytes) -> Optional[bytes]:
        # Streams are keyed by message, not by thread: a signal handler may log a whole record
        # between two chunks of its own thread's record, and both must survive.
        key = (pid, tid, seq)
        if kind == K_FIRST:
            self._streams[key] = ([payload], time.monotonic())
            return None
        current = self._streams.get(key)
        if current is None:
            # A continuation without its start: the start died with a previous listener, or was
            # expired as torn already. Count each broken record once, however many chunks remain.
            if key not in self._orphans:
                if len(self._orphans) >= 4096:
                    self._orphans.clear()
                self._orphans[key] = None
                self.torn += 1
            return None
        current[0].append(payload)
        if kind == K_LAST:
            del self._streams[key]
            return b"".join(current[0])
        self._streams[key] = (current[0], time.monotonic())
        return None

    def expire(self, is_alive: Callable[[int], bool], idle: float = 30.0) -> int:
        """Count as torn the partial records of writers that are gone, or idle for ``idle`` s."""
        now = time.monotonic()
        dead = [k for k, (_p, t) in self._streams.items() if now - t > idle or not is_alive(k[0])]
        for key in dead:
            del self._streams[key]
            self._orphans[key] = None  # chunks that still arrive for it are not counted again
        self.torn += len(dead)
        return len(dead)

    def close(self) -> int:
        """At the end: everything still partial is torn; return how many."""
        n = len(self._streams)
        self._streams.clear()
        self.torn += n
        if self._buf:
            self._skip(len(self._buf))
            self._buf = bytearray()
        return n


def set_pipe_size(fd: int, size: int) -> int:
    """Grow the pipe's kernel buffer towards ``size`` bytes; return what the kernel granted.

    Beyond /proc/sys/fs/pipe-max-size (1 MiB by default) only CAP_SYS_RESOURCE may go, so
    ask for ``size`` first and fall back to the maximum.
    """
    import fcntl
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = 1 << 20
    for want in (size, min(size, ceiling)):
        try:
            return fcntl.fcntl(fd, F_SETPIPE_SZ, want)
        except OSError:
            continue
    try:
        return fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        return 65536


def _never() -> bool:
    return False


def _nothing() -> None:
    pass


class FifoWriter:
    """One process's write end of the service FIFO. Thread-safe without a lock: every frame is
    a single atomic ``write()``; a chunked record's frames carry a per-thread sequence so the
    reader can tell streams apart."""

    def __init__(self, path: str) -> None:
        self.path = path
        # O_NONBLOCK also makes open() fail with ENXIO instead of hanging when no reader exists.
        self.fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.pid = os.getpid()
        self._seq = itertools.count(1)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLOUT)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def write_record(self, kind: int, payload: bytes, timeout: Optional[float],
                     give_up: Callable[[], bool] = _never, on_sent: Callable[[], None] = _nothing) -> bool:
        """Write one message; ``timeout`` None blocks (checking ``give_up`` while waiting).

        Returns False if the first frame found no room in time (nothing was written: the caller
        counts a drop). Once the first frame of a chunked record is in, the rest are written with
        blocking waits, so a started record is finished, not torn, unless ``give_up`` says the
        service is gone. Raises OSError if the first frame meets a broken channel. ``on_sent``
        runs as soon as the first frame is in the pipe: from then on the record counts as sent,
        once, whatever happens to the rest of it.
        """
        if len(payload) <= PAYLOAD_MAX:  # the hot path: one frame, one write, no allocation spree
            # (pid, seq) identifies a message (seq is per process, shared by its threads); the
            # thread id is informative. threading.get_native_id() would cost a gettid syscall.
            tail = _TAIL.pack(kind, 0, len(payload), self.pid, get_ident() & 0xFFFFFFFF, next(self._seq) & 0xFFFFFFFF)
            frame = _HEAD.pack(MAGIC, crc32(payload, crc32(tail))) + tail + payload
            try:
                os.write(self.fd, frame)
                on_sent()
                return True
            except BlockingIOError:
                frames = [frame]
        else:
            frames = encode_frames(kind, self.pid, get_ident() & 0xFFFFFFFF, next(self._seq) & 0xFFFFFFFF, payload)
        deadline = None if timeout is None else time.monotonic() + timeout
        first = True
        for frame in frames:
            while True:
                try:
                    os.write(self.fd, frame)
                    break
                except BlockingIOError:
                    if not self._wait(deadline if first else None, give_up):
                        if first:
                            return False
                        return True  # the service went away mid-record: sent, and torn
                except OSError:
                    if first:
                        raise
                    return True  # EPIPE mid-record: sent (counted once), its rest never arrives
            if first:
                on_sent()
                first = False
        return True

    def write_frames(self, kind: int, payload: bytes, deadline: Optional[float],
                     give_up: Callable[[], bool] = _never) -> bool:
        """``write_record`` with an absolute deadline (for control messages)."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.write_record(kind, payload, timeout, give_up)

    def _wait(self, deadline: Optional[float], give_up: Callable[[], bool]) -> bool:
        while True:
            if deadline is None:
                wait_ms = 100
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait_ms = max(1, min(100, int(left * 1000)))
            if self._poll.poll(wait_ms):
                return True
            if give_up():
                return False
