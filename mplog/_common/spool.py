"""The spool: one single-producer ring per process, in a memory-mapped file of the service.

Why a spool and not a pipe: a pipe holds ~3,000 records, and whatever the listener has read dies
with it. A ring in a file of the service's runtime directory holds ``queue_size`` records of each
process whatever the listener does: a stalled listener costs callers nothing until the ring is
full, and a killed listener's successor carries on from the last record that reached the files,
because the listener advances a ring's tail only *after* it has written the records (commit after
write; see ``_journal``). The files outlive every process of the service, so even a SIGKILL of the
whole process group leaves the records for the next run to recover.

Layout of one ring file (``ring.<slot>``, 0600, in the 0700 runtime directory)::

    page 0   header words (int64): magic, capacity, pid, start time, head, published
             (the producer's), and on another cache line tail, done, pending tail, pending
             done, pending batch (the listener's). One writer per word: nobody can die holding
             a lock another process needs.
    page 1…  the data area, ``capacity`` bytes, entries 8-byte aligned:
             length(4) checksum(4) seq(8) payload, padded; a WRAP entry sends the reader back
             to the start; fewer than 16 bytes before the end are skipped by both sides.

Stores into an ``mmap`` are plain ``memcpy``: on arm64 another process may see the new head
before the payload. So every entry checks itself: its ``seq`` must be the next one expected and
the checksum of its payload (Adler-32; CRC-32 in rings of layout 1) must match. An entry that fails is retried on the next
pass, and counted and skipped only if it still fails when its writer is gone or a second has
passed: the reader never trusts a half-published record.

A record larger than a quarter of the ring goes to a file of its own beside the ring
(``ring.<slot>.<seq>``), and the ring carries a small entry naming its size and checksum. Either way a
record is in the spool, whole, when the logging call returns.
"""

from __future__ import annotations

import errno
import glob
import logging
import mmap
import os
import shutil
import stat
import struct
import time
from typing import TYPE_CHECKING, Any, Container, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple
from zlib import adler32, crc32

from . import compiled as _compiled
from .counters import S_PID, S_RING
from .room import reserve

# The ring's two hot loops in C (mplog/_common/compiled.py says when): the same bytes as the Python
# below, which stays the reference.
_RingCore: Any = None if _compiled.speedups is None else _compiled.speedups.RingCore
_take_entries: Any = None if _compiled.speedups is None else _compiled.speedups.take_entries

if TYPE_CHECKING:  # pragma: no cover
    from .counters import Counters

__all__ = ["RingWriter", "RingReader", "SpoolReader", "ring_capacity", "RING_HEADER", "spool_key", "spool_root",
           "SpoolInfo", "list_spools", "remove_spool", "BYTES_PER_RECORD", "spool_roots", "place_spool",
           "Placement", "filesystem", "free_bytes", "reserve"]

PAGE = mmap.PAGESIZE
RING_HEADER = 4096 if PAGE <= 4096 else PAGE
_MAGIC = 0x6D706C6F67520002  # "mplogR" + layout 2: entries checked with Adler-32
_MAGIC_CRC32 = 0x6D706C6F67520001  # layout 1 (mplog before 0.2): CRC-32; still read, for recovery

# The captured-output FIFOs of a process (``capture_output``): (fd, FIFO name ``<name>.<slot>``,
# logger, level). The worker's thread (``_app.output``) and the listener (``_listener.exits``,
# which drains them after a death) both read them.
STREAMS: Tuple[Tuple[int, str, str, int], ...] = ((1, "out", "stdout", logging.INFO), (2, "err", "stderr", logging.WARNING))
MAX_LINE = 64 * 1024  # a longer line is logged in pieces of this many bytes

# Header words (int64 each).
W_MAGIC, W_CAP, W_PID, W_START, W_HEAD, W_PUBLISHED = 0, 1, 2, 3, 4, 5
W_TAIL, W_DONE, W_PEND_TAIL, W_PEND_DONE, W_PEND_BATCH = 8, 9, 10, 11, 12  # the listener's

_ENTRY = struct.Struct("<IIQ")  # length | flags, checksum of the payload, seq
ENTRY_SIZE = _ENTRY.size  # 16
_pack_entry = _ENTRY.pack_into
_SEQ = struct.Struct("<Q")
WRAP = 0xFFFFFFFF
F_EXTERNAL = 0x80000000  # the payload is (size, crc) of a record in a file of its own
_EXTERNAL = struct.Struct("<QI")
_LEN_MASK = 0x7FFFFFFF

# How queue_size becomes bytes: a record formatted in both default formats is ~350 bytes with its
# entry header; a ring holds ``queue_size`` of those. See README, "Transport".
BYTES_PER_RECORD = 384


# A ring that laps faster than this keeps its pages in memory (see RingReader.commit), as long
# as the busy rings of a spool keep no more than KEEP_BYTES in all (8 rings at the defaults):
# the rest give their pages back per batch, so many processes cannot fill a small /dev/shm.
BUSY_LAP = 5.0
KEEP_BYTES = 32 * 1024 * 1024


class KeepBudget:
    """Which rings of a spool may keep their pages (see RingReader.commit)."""

    def __init__(self, limit: int = KEEP_BYTES) -> None:
        self.limit = limit
        self.kept: Dict[int, int] = {}  # id(reader) -> its capacity

    def claim(self, reader: "RingReader") -> bool:
        key = id(reader)
        if key in self.kept:
            return True
        if sum(self.kept.values()) + reader.capacity > self.limit:
            return False
        self.kept[key] = reader.capacity
        return True

    def drop(self, reader: "RingReader") -> None:
        self.kept.pop(id(reader), None)


def ring_capacity(queue_size: int) -> int:
    """The data area of one ring for ``queue_size`` records: a whole number of pages."""
    want = max(64 * 1024, queue_size * BYTES_PER_RECORD)
    return (want + PAGE - 1) // PAGE * PAGE


def _process_start(pid: int) -> int:
    """The process's start time in clock ticks (/proc), 0 if unknown: with the pid, it names a
    process across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def process_alive(pid: int, start: int = 0) -> bool:
    """True while ``pid`` runs and is not a zombie (and, given ``start``, is the same process)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    if fields[0] in (b"Z", b"X"):
        return False
    return not start or int(fields[19]) == start


def _unmap(words: memoryview, mm: mmap.mmap) -> None:
    try:
        words.release()
        mm.close()
    except (BufferError, ValueError):
        pass  # a caller still holds a view: the mapping goes with the process


# The payload's checksum: a stale entry of an earlier lap fails the sequence check, a torn or
# not-yet-visible one the checksum (and the length must fit the ring). Adler-32, not CRC-32:
# what it guards against is bytes not yet visible or left from an earlier lap, not a noisy
# channel, and it costs the caller 79 ns instead of 183 ns for a 238-byte record (zlib, here).
checksum = adler32


_WRAP_CHECK = checksum(b"")

# A ring reserves its data area lazily, a chunk ahead of its head, so an idle process's ring
# costs a chunk, not its capacity; one posix_fallocate per chunk (~700 records at the defaults).
RESERVE_CHUNK = 256 * 1024
RESERVE_RETRY_S = 0.001  # a refused reservation is tried again after this: drops stay cheap
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class RingWriter:
    """The producer's end of one ring. One process writes it; callers serialise their threads.

    ``write(payload)`` returns True once the record is published, False if the ring has no room
    (in records or in bytes): the caller's overflow policy decides what happens then. Open one
    with ``open_ring_writer``, which picks the compiled one when it can.
    """

    _compiled = False

    def __init__(self, path: str, capacity: int, max_records: int) -> None:
        self.path = path
        self.capacity = capacity
        self.max_records = max_records
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, RING_HEADER + capacity)  # sparse: pages are reserved as they are needed
            if not reserve(fd, 0, RING_HEADER):  # the header is stored into now
                os.unlink(path)
                raise OSError(errno.ENOSPC, "no room for a ring in the spool", path)
            self._ino = os.fstat(fd).st_ino
            self._mm = mmap.mmap(fd, RING_HEADER + capacity)
        finally:
            os.close(fd)
        self.words = memoryview(self._mm)[:RING_HEADER].cast("q")
        pid = os.getpid()
        self.words[W_CAP] = capacity
        self.words[W_PID] = pid
        self.words[W_START] = _process_start(pid)
        self.words[W_MAGIC] = _MAGIC  # last: a reader trusts the header only with the magic
        self._head = 0
        self._seq = 0
        self.inline_max = capacity // 4 - ENTRY_SIZE  # larger payloads go to a file of their own
        self._seq_limit = max_records  # what fits as of the last read of the listener's words
        # Running offsets [head, _reserved) are reserved in the file (see _reserve); _limit never
        # passes it, so neither path stores into a page the filesystem may not have.
        self._reserved = 0
        self._retry_at = 0.0  # after a refused reservation: not again before this (monotonic)
        first = min(capacity, RESERVE_CHUNK)
        self._reserve(0, first, first)  # the first chunk now, so the first record takes the fast path
        self._limit = self._reserved
        if self._compiled:
            self._header = RING_HEADER
            self._attach(self._mm)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._compiled:
            self._detach()  # type: ignore[attr-defined]  # an exported buffer keeps the mapping open
        _unmap(self.words, self._mm)

    def room(self, need: int = ENTRY_SIZE) -> bool:
        words = self.words
        return (self._seq - words[W_DONE] < self.max_records
                and self._head + need - words[W_TAIL] <= self.capacity)

    def _write_slow(self, payload: bytes, length_word: int = -1) -> bool:
        """Publish ``payload`` (``length_word``: a big record's reference entry, see
        _write_external). The caller's hot path: a few stores into the mapping, no system call."""
        n = len(payload)
        if length_word < 0:
            if n > self.inline_max:
                return self._write_external(payload)
            length_word = n
        head = self._head
        end = head + ((n + ENTRY_SIZE + 7) & -8)
        seq = self._seq + 1
        # Room as of the last read of the listener's words, and before the end of the data area:
        # the shared words are read again only when this says no (the tail only moves forward).
        if end > self._limit or seq > self._seq_limit:
            if not self._make_room(end - head):
                return False
            head = self._head
            end = head + ((n + ENTRY_SIZE + 7) & -8)
        at = RING_HEADER + head % self.capacity
        mm = self._mm
        _pack_entry(mm, at, length_word, checksum(payload), seq)
        mm[at + ENTRY_SIZE:at + ENTRY_SIZE + n] = payload
        self._head = end
        self._seq = seq
        # Head last: everything the reader may read is stored before it (and checked anyway).
        words = self.words
        words[W_HEAD] = end
        words[W_PUBLISHED] = seq
        return True

    def _make_room(self, need: int) -> bool:
        """Read the listener's words again; wrap to the start of the data area if ``need`` bytes
        do not fit before its end. False if there is no room."""
        words = self.words
        cap = self.capacity
        self._seq_limit = words[W_DONE] + self.max_records
        tail_limit = words[W_TAIL] + cap
        head = self._head
        left = cap - head % cap
        lap_end = head + left
        if self._seq + 1 > self._seq_limit:
            return False
        if need > left:  # wrap: a WRAP entry (or fewer than 16 bytes skipped), then the start
            if lap_end + need > tail_limit:
                return False
            if left >= ENTRY_SIZE:
                if head + ENTRY_SIZE > self._reserved and not self._reserve(head, head + ENTRY_SIZE, lap_end):
                    return False
                _ENTRY.pack_into(self._mm, RING_HEADER + head % cap, WRAP, _WRAP_CHECK, self._seq + 1)
            self._head = head = self._reserved = lap_end  # nothing of the next lap is known reserved
            lap_end += cap
        elif head + need > tail_limit:
            return False
        if head + need > self._reserved:
            # Up to a chunk ahead, never past the page holding the listener's tail (its pages
            # are given back only behind it, see RingReader._release), nor the end of the lap.
            bound = min(lap_end, -(-tail_limit // PAGE) * PAGE)
            if not self._reserve(max(self._reserved, head), min(bound, head + need + RESERVE_CHUNK), bound,
                                 head + need):
                return False
        self._limit = min(tail_limit, lap_end, self._reserved)
        return True

    def _reserve(self, start: int, stop: int, bound: int, least: int = -1) -> bool:
        """Reserve running offsets [start, stop) (one lap), or at least [start, least): True if
        [start, least or stop) is reserved. The pages a store may touch must be the
        filesystem's before it: a store into a page a full tmpfs cannot back is a SIGBUS."""
        least = stop if least < 0 else least
        now = time.monotonic()
        if now < self._retry_at:
            return False  # refused a moment ago: a full ring, without a system call per record
        at = RING_HEADER + start % self.capacity
        ok = False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            fd = -1  # the spool is gone (stopped): no room
        if fd >= 0:
            try:
                if os.fstat(fd).st_ino == self._ino:
                    for end in (stop, least) if least < stop else (stop,):
                        if reserve(fd, at, min(bound, end) - start):
                            self._reserved = min(bound, end)
                            ok = True
                            break
            finally:
                os.close(fd)
        if not ok:
            self._retry_at = now + RESERVE_RETRY_S
        return ok and self._reserved >= least

    def _write_external(self, payload: bytes) -> bool:
        seq = self._seq + 1
        if not self.room(ENTRY_SIZE * 2 + _EXTERNAL.size + 8):
            return False
        path = f"{self.path}.{seq}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            try:
                os.unlink(path)
            except OSError:
                pass
            if exc.errno in _NO_ROOM:
                return False  # no room for its file: the ring is full (the overflow policy)
            raise
        if not self.write(_EXTERNAL.pack(len(payload), checksum(payload)), F_EXTERNAL | _EXTERNAL.size):
            os.unlink(path)
            return False
        return True

    write = _write_slow


if _RingCore is not None:
    class _CompiledRingWriter(_RingCore, RingWriter):  # type: ignore[misc,valid-type]
        """RingCore's write() first: it does the common case in C and calls _write_slow for the
        rest; its members hold the state the Python methods share with it (_head, _seq...)."""

        _compiled = True


def open_ring_writer(path: str, capacity: int, max_records: int) -> RingWriter:
    if _compiled.enabled():
        return _CompiledRingWriter(path, capacity, max_records)  # type: ignore[no-any-return]
    return RingWriter(path, capacity, max_records)


# What one ring may hand the listener per pass, in bytes (ring bytes of its entries, and the
# size of each big record's file), always at least one record: a process logging 4 MB records
# fills no whole batch (flush_count of them, gigabytes formatted in memory), and the other
# rings get their turn after each megabyte (issue 30, item 5).
TAKE_BUDGET = 1024 * 1024


class Taken(NamedTuple):
    """What one pass over a ring took: payloads, and where the ring's tail goes once written."""

    payloads: List[bytes]
    pos: int
    done: int
    externals: List[str]


class RingReader:
    """The listener's view of one ring: reads from its committed tail, commits after writing."""

    def __init__(self, path: str, slot: int, budget: Optional[KeepBudget] = None) -> None:
        self.path = path
        self.slot = slot
        self.budget = budget
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size <= RING_HEADER:
                raise OSError(errno.EINVAL, "not an mplog ring", path)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.words = memoryview(self._mm)[:RING_HEADER].cast("q")
        magic = self.words[W_MAGIC]
        if magic not in (_MAGIC, _MAGIC_CRC32) or self.words[W_CAP] != size - RING_HEADER:
            self.close()
            raise OSError(errno.EINVAL, "not an mplog ring", path)
        self.check = checksum if magic == _MAGIC else crc32
        self._take_entries = _take_entries if magic == _MAGIC and _compiled.enabled() else None
        self.capacity = size - RING_HEADER
        self.pid = self.words[W_PID]
        self.start = self.words[W_START]
        # Where the next read starts: the committed tail, unless a batch is in hand.
        self.pos = self.words[W_TAIL]
        self.done = self.words[W_DONE]
        self.bad_since = 0.0  # when an entry first failed its check at ``pos``
        self.corrupt = 0  # records skipped because they failed their check for good
        self.can_release = hasattr(mmap, "MADV_REMOVE")
        # Lapping faster than BUSY_LAP: its pages stay (see commit). Until its first lap is
        # done a ring is taken for busy: pages given back in it would be faulted in the next.
        self.busy = budget is None or budget.claim(self)
        self._lap = -1
        self._lap_started = 0.0
        self.last: Optional[bytes] = None  # the latest payload taken (for the record of its end)
        self.stamped: Optional[bytes] = None  # the one whose time is in the slot (S_LAST_NS)
        self.cut = False  # the last take stopped at the byte budget with more waiting

    def close(self) -> None:
        if self.budget is not None:
            self.budget.drop(self)
        _unmap(self.words, self._mm)

    @property
    def head(self) -> int:
        return self.words[W_HEAD]

    def backlog(self) -> int:
        """Records published and not yet committed."""
        return max(0, self.words[W_PUBLISHED] - self.words[W_DONE])

    def empty(self) -> bool:
        return self.words[W_HEAD] == self.words[W_TAIL]

    def take(self, limit: int, producer_gone: bool = False, budget: int = TAKE_BUDGET) -> Taken:
        """Read up to ``limit`` records after ``pos`` (not committing them), and no more than
        about ``budget`` bytes of them (always at least one record): ``cut`` says the budget,
        not the ring, ended this pass."""
        words = self.words
        head = words[W_HEAD]
        pos, done = self.pos, self.done
        start = pos
        self.cut = False
        cap = self.capacity
        mm = self._mm
        out: List[bytes] = []
        externals: List[str] = []
        unpack = _ENTRY.unpack_from
        # The hot loop: whole entries in order, each checked. Anything else (the end of the data
        # area, a WRAP, a big record's reference, an entry that fails its check) is left to the
        # general loop below, from where this one stopped.
        # The byte budget bounds where an entry may start (``stop``): what is taken is at most the
        # budget plus one entry, and the compiled loop needs no byte count of its own.
        stop = min(head, pos + budget)
        if self._take_entries is not None:
            pos, done = self._take_entries(mm, RING_HEADER, cap, pos, done, stop, limit, out)
        else:
            data_end = RING_HEADER + cap
            append = out.append
            check = self.check
            while pos < stop and len(out) < limit:
                at = RING_HEADER + pos % cap
                if at + ENTRY_SIZE > data_end:
                    break
                length_word, crc, seq = unpack(mm, at)
                end = at + ENTRY_SIZE + length_word  # a WRAP's or a reference's flag bits make it "too long"
                if seq != done + 1 or end > data_end:
                    break
                payload = mm[at + ENTRY_SIZE:end]
                if check(payload) != crc:
                    break
                append(payload)
                pos += (ENTRY_SIZE + length_word + 7) & -8
                done = seq
        if out:
            self.bad_since = 0.0
        used = pos - start  # ring bytes, and a big record's file size (below)
        while pos < head and len(out) < limit:
            if out and used >= budget:
                self.cut = True  # more is waiting: the next pass, after the other rings' turn
                break
            off = pos % cap
            left = cap - off
            if left < ENTRY_SIZE:
                pos += left
                continue
            at = RING_HEADER + off
            length_word, crc, seq = unpack(mm, at)
            expected = done + 1
            if length_word == WRAP:
                if seq == expected and crc == self.check(b""):
                    pos += left
                    continue
                if self._failed(pos, head, producer_gone):
                    return self._skip(out, externals)
                break
            n = length_word & _LEN_MASK
            payload = mm[at + ENTRY_SIZE:at + ENTRY_SIZE + n] if ENTRY_SIZE + n <= left else b""
            if seq != expected or len(payload) != n or self.check(payload) != crc:
                if self._failed(pos, head, producer_gone):
                    return self._skip(out, externals)
                break
            if length_word & F_EXTERNAL:
                ext = self._external(seq, payload)
                if ext is None:
                    self.corrupt += 1
                    payload = b""
                else:
                    payload, path = ext
                    externals.append(path)
                    used += len(payload)
            self.bad_since = 0.0
            if payload:
                out.append(payload)
            step = (ENTRY_SIZE + n + 7) & ~7
            pos += step
            used += step
            done = seq
        self.pos, self.done = pos, done
        return Taken(out, pos, done, externals)

    def _external(self, seq: int, ref: bytes) -> Optional[Tuple[bytes, str]]:
        size, crc = _EXTERNAL.unpack(ref)
        path = f"{self.path}.{seq}"
        try:
            with open(path, "rb") as f:
                data = f.read(size + 1)
        except OSError:
            return None
        if len(data) != size or self.check(data) != crc:
            return None
        return data, path

    def _failed(self, pos: int, head: int, producer_gone: bool) -> bool:
        # Not yet visible (weakly ordered stores), or really bad: wait a second, or for the
        # writer's death, before deciding it is bad.
        now = time.monotonic()
        if not self.bad_since:
            self.bad_since = now
        return producer_gone or now - self.bad_since >= 1.0

    def _skip(self, out: List[bytes], externals: List[str]) -> Taken:
        # Resynchronise at the head: every published record up to it that we could not read is
        # counted as failing its check, never written.
        words = self.words
        published = words[W_PUBLISHED]
        self.corrupt += max(0, published - self.done)
        self.pos, self.done = words[W_HEAD], max(self.done, published)
        self.bad_since = 0.0
        return Taken(out, self.pos, self.done, externals)

    def rewind(self) -> None:
        """Forget what was taken and not committed (a failed batch is read again)."""
        self.pos, self.done = self.words[W_TAIL], self.words[W_DONE]

    # -- the journal's hooks ---------------------------------------------------------------
    def announce(self, batch: int, pos: int, done: int) -> None:
        w = self.words
        w[W_PEND_TAIL] = pos
        w[W_PEND_DONE] = done
        w[W_PEND_BATCH] = batch  # last: the two above belong to this batch

    def commit(self, pos: int, done: int) -> None:
        """Give the space up to ``pos`` back to the producer (after the records are written)."""
        w = self.words
        if self.can_release:
            # A page given back costs the producer a page fault when its next lap reaches it
            # (~200 ns a record, and faults contend with madvise: at 8 busy writers on 2 cores,
            # 14% of the throughput and twice the caller's p99). So a ring that laps in less
            # than BUSY_LAP keeps its pages (its memory is its capacity, as it would soon be
            # anyway); a slower one gives back what each batch consumed (its memory is its
            # backlog). Pages can only be given back here, before the tail passes them.
            lap = pos // self.capacity
            if lap != self._lap:
                now = time.monotonic()
                fast = self._lap < 0 or now - self._lap_started < BUSY_LAP
                self.busy = fast and (self.budget is None or self.budget.claim(self))
                if not self.busy and self.budget is not None:
                    self.budget.drop(self)
                self._lap, self._lap_started = lap, now
            if not self.busy:
                self._release(w[W_TAIL], pos)
        w[W_DONE] = done
        w[W_TAIL] = pos

    def settle(self, batch: int) -> bool:
        """After a listener died: commit its announced batch if it was ``batch``."""
        w = self.words
        if w[W_PEND_BATCH] == batch and w[W_PEND_TAIL] > w[W_TAIL]:
            w[W_DONE] = w[W_PEND_DONE]
            w[W_TAIL] = w[W_PEND_TAIL]
            self.pos, self.done = w[W_TAIL], w[W_DONE]
            return True
        return False

    def _release(self, old: int, new: int) -> None:
        # Hand the pages of what this commit consumed back to the kernel before the producer may
        # reuse them, so a ring costs memory for its backlog, not its capacity (tmpfs keeps a
        # touched page until then). Only whole pages inside [old, new): the producer may already
        # be writing the next lap into the rest of the page that holds ``old``, so that page (one
        # per batch, ~0.5 MB a ring at the defaults) stays. One madvise() per batch.
        cap = self.capacity
        start = (old + PAGE - 1) // PAGE * PAGE
        stop = new // PAGE * PAGE
        while start < stop:
            off = start % cap
            length = min(stop - start, cap - off)
            try:
                self._mm.madvise(mmap.MADV_REMOVE, RING_HEADER + off, length)
            except (OSError, ValueError):
                self.can_release = False  # not tmpfs, or not allowed: the pages stay, only memory
                return
            start += length


# -- the spool directory ---------------------------------------------------------------------
def _root_candidates() -> List[str]:
    import tempfile
    out: List[str] = []
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm", tempfile.gettempdir(), "/var/tmp"):
        if (candidate and candidate not in out and os.path.isdir(candidate)
                and os.access(candidate, os.W_OK | os.X_OK)):
            out.append(candidate)
    return out


def unsafe_root(path: str) -> str:
    """Why no spool may live in ``path`` ("" if one may). In a directory that another user owns,
    or that others can write and that has no sticky bit, another user can rename our 0700 spool
    away and put one of theirs at its name, which the next run would then recover from."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if st.st_uid not in (os.getuid(), 0):
        return f"it belongs to uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return "others can write it and it has no sticky bit"
    return ""


def _vetted_roots() -> Tuple[List[str], List[Tuple[str, str]]]:
    """The candidate roots a spool may use, in order, and (root, why) of those ``unsafe_root``
    refuses: one stat of each."""
    ok: List[str] = []
    refused: List[Tuple[str, str]] = []
    for candidate in _root_candidates():
        why = unsafe_root(candidate)
        if why:
            refused.append((candidate, why))
        else:
            ok.append(candidate)
    return ok, refused


def spool_roots() -> List[str]:
    """Where spools may live, in order of preference: tmpfs (``XDG_RUNTIME_DIR``, ``/dev/shm``),
    then a local disk directory (``TMPDIR`` or ``/tmp``, ``/var/tmp``); never a root that
    ``unsafe_root`` refuses."""
    import tempfile
    return _vetted_roots()[0] or [tempfile.gettempdir()]


def spool_root() -> str:
    """The preferred spool root: tmpfs when there is one (``XDG_RUNTIME_DIR``, ``/dev/shm``)."""
    return spool_roots()[0]


def free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def filesystem(path: str) -> Tuple[str, str]:
    """The mount point and type of the filesystem holding ``path`` (/proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "/", kind
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return best or "/", kind


# The spool must hold a full ring for each process a pool on this machine runs by default (one
# per CPU it may use) and the main process's, plus the counters' reserved pages.
COUNTER_BYTES = 64 * 1024


def expected_processes() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus + 1


class Placement(NamedTuple):
    root: str
    need: int  # bytes: full rings for expected_processes(), and the counters
    free: int  # the chosen root's free bytes when chosen
    notice: str  # why the preferred root was passed over ("" if it was not)


def place_spool(ring_file_bytes: int) -> Placement:
    """The first root whose free room holds the rings a stall could fill (a tmpfs cannot
    page out: past its room a ring is full and drops); if none has it, the roomiest."""
    roots = spool_roots()
    processes = expected_processes()
    need = processes * ring_file_bytes + COUNTER_BYTES
    room = [(root, free_bytes(root)) for root in roots]
    chosen = next(((r, f) for r, f in room if f >= need), None) or max(room, key=lambda rf: rf[1])
    notice = ""
    if chosen[0] != roots[0]:
        mib = 1024 * 1024
        first, free = room[0]
        notice = (f"the spool is in {chosen[0]} ({filesystem(chosen[0])[1]}, {chosen[1] / mib:.1f} MiB free): "
                  f"{first} ({filesystem(first)[1]}) has {free / mib:.1f} MiB free, and {processes} rings of "
                  f"{ring_file_bytes / mib:.1f} MiB ({processes - 1} CPUs and the main process) need "
                  f"{need / mib:.1f} MiB")
        if chosen[1] < need:
            notice += "; no root has that room: rings that find none are full and the overflow policy applies"
    refused = "; ".join(f"{root} is not used: {why}" for root, why in _vetted_roots()[1])
    if refused:
        notice = f"{notice}; {refused}" if notice else f"the spool is in {chosen[0]}: {refused}"
    return Placement(chosen[0], need, chosen[1], notice)


def spool_key(directory: str, name: str) -> str:
    """A spool's name for a file set: the next run on the same directory and name finds it."""
    real = os.path.realpath(directory)
    data = f"{real}\0{name}".encode("utf-8", "surrogateescape")
    # 64 bits from two different checksums, not hashlib: importing it loads OpenSSL, 3.6 MB in
    # every process of the service (a forked worker maps its parent's). The key only tells one
    # file set's spools from another's, among one user's.
    return f"{crc32(data):08x}{adler32(data):08x}"


def spool_prefix(directory: str, name: str) -> str:
    return f"mplog-{os.getuid()}-{spool_key(directory, name)}-"


class SpoolInfo(NamedTuple):
    path: str
    owner_pid: int
    owner_start: int
    alive: bool
    directory: str
    name: str
    unwritten: int
    bytes: int
    age_s: float


def write_owner(runtime: str, directory: str, name: str) -> None:
    pid = os.getpid()
    text = f"{pid} {_process_start(pid)}\n{os.path.realpath(directory)}\n{name}\n"
    tmp = os.path.join(runtime, ".owner")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(runtime, "owner"))


def read_owner(runtime: str) -> Tuple[int, int, str, str]:
    try:
        with open(os.path.join(runtime, "owner")) as f:
            first, directory, name = (f.read().split("\n") + ["", ""])[:3]
        pid, start = (int(x) for x in first.split())
        return pid, start, directory, name
    except (OSError, ValueError):
        return 0, 0, "", ""


def rings_in(runtime: str) -> Iterator[Tuple[int, str]]:
    for path in glob.glob(os.path.join(glob.escape(runtime), "ring.*")):
        suffix = os.path.basename(path)[5:]
        if suffix.isdigit():
            yield int(suffix), path


def unwritten_records(runtime: str) -> int:
    total = 0
    for slot, path in rings_in(runtime):
        try:
            ring = RingReader(path, slot)
        except OSError:
            continue
        total += ring.backlog()
        ring.close()
    return total


def _listener_alive(runtime: str) -> bool:
    """A listener may outlive its application while it drains: its spool is not an orphan."""
    from .counters import Counters
    try:
        counters = Counters.open(os.path.join(runtime, "counters"))
    except (OSError, ValueError):
        return False
    try:
        pid = counters.get("listener_pid")
    finally:
        counters.close()
    if not process_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mplog._listener" in f.read()
    except OSError:
        return True


def _usage(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            pass
    return total


def list_spools(root: Optional[str] = None, prefix: str = "") -> List[SpoolInfo]:
    """This user's spools under ``root``, or under every root a spool may be placed in
    (``prefix`` narrows to one file set)."""
    if root is None:
        return [info for r in spool_roots() for info in list_spools(r, prefix)]
    mine = f"mplog-{os.getuid()}-"
    out: List[SpoolInfo] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return out
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(mine) or not entry.name.startswith(prefix or mine):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid, start, directory, name = read_owner(entry.path)
        if not pid and now - st.st_mtime < 60:
            continue  # being created (the owner file comes right after the directory)
        alive = process_alive(pid, start) or _listener_alive(entry.path)
        try:
            usage = _usage(entry.path)
        except OSError:
            usage = 0
        out.append(SpoolInfo(entry.path, pid, start, alive, directory, name, unwritten_records(entry.path),
                             usage, now - st.st_mtime))
    return out


def remove_spool(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def clean_spools(max_age_s: float, root: Optional[str] = None) -> List[SpoolInfo]:
    """Remove spools whose owner is gone: at once if they hold nothing unwritten, after
    ``max_age_s`` seconds if they do (their run was never repeated). Returns what was removed."""
    removed = []
    for info in list_spools(root):
        if info.alive:
            continue
        if info.unwritten == 0 or info.age_s >= max_age_s:
            remove_spool(info.path)
            removed.append(info)
    return removed


def touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


SPOOL_MAX_AGE_S = 7 * 86400  # an abandoned spool with records in it is kept a week


class SpoolReader:
    """The listener's intake: every ring of a spool, found through the counter slots that name
    them, read in turn so that no process's records wait behind another's."""

    def __init__(self, runtime: str, counters: "Counters") -> None:
        self.runtime = runtime
        self.counters = counters
        self.rings: Dict[int, RingReader] = {}
        self._scanned = 0  # slots below this were looked at
        self._waiting: Dict[int, int] = {}  # slot -> pid: claimed, no ring yet
        self._turn = 0
        self.corrupt = 0
        self.retired = 0
        self.open_errors = 0
        self.gone: Set[int] = set()  # slots whose process ended: a bad entry will never mend
        self.cut = False  # the last take left records behind for the byte budget: a backlog
        # Which busy rings keep their pages: at most a quarter of the spool's filesystem, so
        # that on a small tmpfs the pages go back to the rings that need room.
        try:
            st = os.statvfs(runtime)
            size = st.f_blocks * st.f_frsize
        except OSError:
            size = 0
        self.keep = KeepBudget(min(KEEP_BYTES, size // 4) if size else KEEP_BYTES)

    def refresh(self) -> None:
        """Open the rings of processes that started logging since the last look."""
        counters = self.counters
        used = counters.slots_used
        for index in range(self._scanned, used):
            self._waiting[index] = counters.slot(index).get(S_PID)
        self._scanned = used
        for index in list(self._waiting):
            if counters.slot(index).get(S_RING):
                try:
                    self.rings[index] = RingReader(os.path.join(self.runtime, f"ring.{index}"), index,
                                                   self.keep)
                except (FileNotFoundError, NotADirectoryError):
                    pass  # removed already (a recovered spool): nothing to read
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        pass  # not a ring: nothing to read
                    else:
                        self.open_errors += 1  # EMFILE, ENOMEM: try again on the next look
                        continue
                del self._waiting[index]

    def take(self, limit: int, only: Optional[RingReader] = None) -> List[Tuple[RingReader, Taken]]:
        """Up to ``limit`` records, from the rings in turn, or from ``only`` (not committed:
        see _journal); from each ring no more than its byte budget (``RingReader.take``), so
        that one process's big records do not make the others wait."""
        out: List[Tuple[RingReader, Taken]] = []
        self.cut = False
        if only is not None:
            rings = [only]
        else:
            rings = list(self.rings.values())
            if not rings:
                return out
            self._turn = (self._turn + 1) % len(rings)
            rings = rings[self._turn:] + rings[:self._turn]
        left = limit
        for ring in rings:
            if ring.pos >= ring.words[W_HEAD]:
                continue
            before = ring.corrupt
            t = ring.take(left, ring.slot in self.gone)
            self.cut = self.cut or ring.cut
            if ring.corrupt != before:
                self.corrupt += ring.corrupt - before
            if t.pos != ring.words[W_TAIL]:
                out.append((ring, t))
            left -= len(t.payloads)
            if left <= 0:
                break
        return out

    def has_backlog(self) -> bool:
        for index in self._waiting:
            if self.counters.slot(index).get(S_RING):
                return True  # a ring we could not open yet holds records
        for ring in self.rings.values():
            if ring.pos < ring.words[W_HEAD]:
                return True
        return False

    def unwritten(self) -> int:
        return sum(ring.backlog() for ring in self.rings.values())

    def rewind(self) -> None:
        for ring in self.rings.values():
            ring.rewind()

    def producers_alive(self) -> List[int]:
        return [r.pid for r in self.rings.values() if process_alive(r.pid, r.start)]

    def retire(self, keep: Container[int] = ()) -> int:
        """Close and remove the rings of processes that are gone, once they are empty (worker
        churn must not fill the spool), but not those in ``keep`` (the end of their process is
        not written yet). Returns how many."""
        gone = 0
        names: Optional[List[str]] = None  # the spool's files, listed once for every ring retired
        for index, ring in list(self.rings.items()):
            if index in keep:
                continue
            if ring.empty() and ring.pos == ring.words[W_HEAD] and not process_alive(ring.pid, ring.start):
                # Read once more: the producer may have published between the two checks.
                if not ring.empty():
                    continue
                ring.close()
                del self.rings[index]
                self.gone.discard(index)
                if names is None:
                    try:
                        names = os.listdir(self.runtime)
                    except OSError:
                        names = []
                base = os.path.basename(ring.path) + "."  # its big records' files
                for path in [ring.path] + [os.path.join(self.runtime, n) for n in names if n.startswith(base)]:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                gone += 1
        for index, pid in list(self._waiting.items()):
            if not process_alive(pid) and not self.counters.slot(index).get(S_RING):
                del self._waiting[index]
        self.retired += gone
        return gone

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
