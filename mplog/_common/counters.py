"""Shared counters: one small memory-mapped file that every process of a service can reach.

Accounting must survive any process being killed, so no counter is guarded by a lock another
process could die holding. Each process increments only its own *slot* (sent, dropped,
replaced, diverted); the listener owns the service fields (written, lost, ...) and each slot's
``seen``; the main process owns ``state`` until the listener's final word. A slot is claimed once
per process under an ``fcntl`` lock, which the kernel releases if the claimer dies. Readers sum
the slots; a torn 8-byte read cannot happen on the platforms we support (aligned 64-bit stores).
A slot's index also names the process's ring in the spool (``ring.<index>``).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from typing import Dict, List

__all__ = ["Counters", "FIELDS", "OVERFLOW_SLOT", "SLOT_FIELDS", "SLOT_WORDS", "STATE_NAMES", "Slot", "settle_accounts"]

# Service fields, by index into the int64 array.
FIELDS = (
    "magic", "state", "received", "written", "pending", "full_start", "full_expected",
    "simp_start", "simp_expected", "torn", "malformed", "lost_listener", "last_write_ns",
    "flushed_token", "listener_pid", "slots_used", "replaced_listener", "stderr_records",
    "write_errors", "rotations", "pending_base", "error_ns", "reopens", "full_ino", "simp_ino",
    "syslog_connected", "syslog_forwarded", "syslog_dropped", "syslog_lost", "syslog_pending",
    "syslog_reconnects", "syslog_resets",
    # the spool (see _spool, _journal)
    "batch", "sleeping", "recovered", "final_written", "final_sent", "final_dropped", "final_diverted",
    "final_lost", "final_set",
    # the supervisor's restarts whose notice a listener has written (see _supervisor._spawn)
    "restarts_noted",
    # the listener's own vitals for health, sampled with psutil once a second (see _listener.vitals.Vitals)
    "vital_pid", "vital_ns", "vital_cpu_centi", "vital_rss", "vital_fds", "vital_create_us", "main_create_us",
    # the pid that sent the latest stop frame: an exit nobody in the main process asked for is
    # named after it (see _supervisor._on_exit)
    "stop_pid",
)
_INDEX = {name: i for i, name in enumerate(FIELDS)}
assert len(FIELDS) <= 96
HEADER_WORDS = 128
_TEXT_WORD, _TEXT_BYTES = 96, 256  # words 96..127: the listener's last error, as UTF-8
SLOT_FIELDS = ("pid", "sent", "dropped", "replaced", "diverted", "ring", "seen", "errors",
               # who the process is and how it ended (see _process and _exits)
               "start", "wstate", "last_ns", "death", "death_ns", "watched", "ppid", "name")  # name: 9 words
SLOT_WORDS = 24
# Word offsets inside a slot. The process writes all but ``seen``, ``last_ns``, ``death``,
# ``death_ns`` and ``watched``, which the listener writes.
S_PID, S_SENT, S_DROPPED, S_REPLACED, S_DIVERTED, S_RING, S_SEEN, S_ERRORS = range(8)
S_START = 8  # the process's start time in clock ticks after boot: with the pid, its identity
S_WSTATE = 9  # the process's own word: what it watches (W_*) and how it exited (X_*)
S_LAST_NS = 10  # the listener's: when the latest record it wrote from this process was logged
S_DEATH = 11  # the listener's: how the process ended (see _deathword.pack), 0 while it runs
S_DEATH_NS = 12  # the listener's: when it saw the process end
S_WATCHED = 13  # the listener's: 1 once it holds a pidfd for the process
S_PPID = 14  # the process's parent when it claimed the slot
# Words 15..23: the process name, UTF-8, NUL-padded, cut at 72 bytes (a nested pool's worker
# is "ForkServerPoolWorker-12:3"; the 24 bytes a 16-word slot had left were too few).
S_NAME, NAME_BYTES = 15, 72
MAX_SLOTS = 1 << 16
# Where a claim that finds no slot goes (no room for its page, or MAX_SLOTS reached): one slot
# shared by every such process, which therefore gets no ring (its records are diverted to stderr,
# counted here) and is summed with the others whatever slots_used says.
OVERFLOW_SLOT = MAX_SLOTS - 1
_MAGIC = 0x6D706C6F67310003  # layout 3: 24-word slots

# S_WSTATE bits. Set at the claim: what this process has mplog watch.
W_FAULTS = 1 << 0  # faulthandler writes this process's crash stacks to ``fault.<slot>``
W_CAPTURE = 1 << 1  # its fd 1 and 2 go to ``out.<slot>`` and ``err.<slot>`` (capture_output)
# Set at its exit, by the process itself.
X_CLEAN = 1 << 8  # it reached its normal exit (multiprocessing's exit function, or atexit)
X_CODE_KNOWN = 1 << 9  # ... and knew its exit status, in the bits X_CODE_SHIFT.. (0..255)
X_UNCAUGHT = 1 << 10  # an uncaught exception ended its main thread (a Process target)
X_CODE_SHIFT = 16
_SLOTS_AT_START = 84  # the header and these fill 5 pages: the main process and its first workers
_SIZE = 8 * (HEADER_WORDS + SLOT_WORDS * MAX_SLOTS)  # 12 MiB, sparse on tmpfs: 192 bytes a process

STATE_STARTING, STATE_RUNNING, STATE_DEGRADED, STATE_STOPPING, STATE_STOPPED = range(5)
STATE_NAMES = ("starting", "running", "degraded", "stopping", "stopped")


def _reserve(fd: int, offset: int, length: int) -> bool:
    from .room import reserve  # the one way mplog reserves room (posix_fallocate)
    return reserve(fd, offset, length)


class Counters:
    """A view of the shared counter file. ``create`` makes it; ``open`` attaches to it."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._mm = mm
        self.words = memoryview(mm).cast("q")

    @classmethod
    def create(cls, path: str) -> "Counters":
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, _SIZE)
        # Sparse, but every page a process stores into is reserved first (a store into a page a
        # full tmpfs cannot back is a SIGBUS): the header and the first slots now, the shared
        # overflow slot (the fallback of a claim that finds no room), each further slot at its claim.
        last = 8 * (HEADER_WORDS + SLOT_WORDS * OVERFLOW_SLOT)
        if not (_reserve(fd, 0, 8 * (HEADER_WORDS + SLOT_WORDS * _SLOTS_AT_START))
                and _reserve(fd, last, 8 * SLOT_WORDS)):
            os.close(fd)
            os.unlink(path)
            raise OSError(errno.ENOSPC, "no room for the counters in the spool", path)
        self = cls(path, fd, mmap.mmap(fd, _SIZE))
        self.words[_INDEX["magic"]] = _MAGIC
        return self

    @classmethod
    def open(cls, path: str) -> "Counters":
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            mm = mmap.mmap(fd, _SIZE)
        except (OSError, ValueError):
            os.close(fd)
            raise
        self = cls(path, fd, mm)
        if self.words[_INDEX["magic"]] != _MAGIC:
            self.close()
            raise OSError(f"{path}: not an mplog counter file")
        return self

    def close(self) -> None:
        try:
            self.words.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass  # a caller still holds a view; the mapping goes with the process
        try:
            os.close(self._fd)
        except OSError:
            pass

    # -- service fields -------------------------------------------------------------------
    def get(self, name: str) -> int:
        return self.words[_INDEX[name]]

    def set(self, name: str, value: int) -> None:
        self.words[_INDEX[name]] = value

    def add(self, name: str, value: int = 1) -> None:
        # Only the field's single owner process calls this; see the module docstring.
        self.words[_INDEX[name]] += value

    def set_text(self, text: str) -> None:
        data = text.encode("utf-8", "replace")[:_TEXT_BYTES - 1]
        start = 8 * _TEXT_WORD
        self._mm[start:start + _TEXT_BYTES] = data + b"\0" * (_TEXT_BYTES - len(data))

    def get_text(self) -> str:
        start = 8 * _TEXT_WORD
        return self._mm[start:start + _TEXT_BYTES].split(b"\0", 1)[0].decode("utf-8", "replace")

    # -- per-process slots ----------------------------------------------------------------
    def claim_slot(self, pid: int, start: int = 0, name: str = "", ppid: int = 0) -> "Slot":
        """A fresh slot for ``pid`` (started at ``start`` ticks, called ``name``, child of
        ``ppid``). Never reused: a dead process's counts stay in the sums."""
        words = self.words
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 8, 8 * _INDEX["slots_used"], os.SEEK_SET)
        try:
            used = words[_INDEX["slots_used"]]
            if used >= MAX_SLOTS or not _reserve(self._fd, 8 * (HEADER_WORDS + SLOT_WORDS * used), 8 * SLOT_WORDS):
                # The shared overflow slot: increments may race (documented). Also where a
                # claim finds no room for its slot's page: counted, not a SIGBUS.
                slot, used = OVERFLOW_SLOT, MAX_SLOTS
            else:
                slot = used
            base = HEADER_WORDS + SLOT_WORDS * slot
            # Who it is, before the slot is counted: a reader of slots_used never sees a slot
            # without its pid (the listener watches processes from these words).
            words[base + S_PID] = pid
            words[base + S_START] = start
            words[base + S_PPID] = ppid
            raw = name.encode("utf-8", "replace")[:NAME_BYTES]
            while raw:
                try:
                    raw.decode("utf-8")
                    break
                except UnicodeDecodeError:  # cut inside a character: drop what is left of it
                    raw = raw[:-1]
            self._mm[8 * (base + S_NAME):8 * (base + S_NAME) + NAME_BYTES] = raw.ljust(NAME_BYTES, b"\0")
            if used < MAX_SLOTS:
                words[_INDEX["slots_used"]] = used + 1
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 8, 8 * _INDEX["slots_used"], os.SEEK_SET)
        return Slot(self.words, slot)

    def slot_name(self, index: int) -> str:
        at = 8 * (HEADER_WORDS + SLOT_WORDS * index + S_NAME)
        return self._mm[at:at + NAME_BYTES].split(b"\0", 1)[0].decode("utf-8", "replace")

    def slot_column(self, offset: int) -> List[int]:
        """One word of every slot in use (a strided copy, made in C)."""
        start = HEADER_WORDS + offset
        return list(self.words[start:start + SLOT_WORDS * self.slots_used:SLOT_WORDS])

    def slot(self, index: int) -> "Slot":
        return Slot(self.words, index)

    @property
    def slots_used(self) -> int:
        return min(self.words[_INDEX["slots_used"]], MAX_SLOTS)

    def _overflow_in_use(self) -> bool:
        """The overflow slot holds counts and lies past slots_used (it does until MAX_SLOTS
        slots are claimed): it is summed on its own."""
        return self.slots_used < MAX_SLOTS and self.words[HEADER_WORDS + SLOT_WORDS * OVERFLOW_SLOT + S_PID] != 0

    def slot_indexes(self) -> List[int]:
        """Every slot that holds counts: those in use, and the overflow slot once a claim went there."""
        return list(range(self.slots_used)) + ([OVERFLOW_SLOT] if self._overflow_in_use() else [])

    def slot_totals(self, settle: bool = False) -> Dict[str, int]:
        used = self.slots_used
        words = self.words
        start = HEADER_WORDS
        stop = HEADER_WORDS + SLOT_WORDS * used
        extra = [HEADER_WORDS + SLOT_WORDS * OVERFLOW_SLOT] if self._overflow_in_use() else []

        def total(field: int) -> int:
            return sum(words[start + field:stop:SLOT_WORDS]) + sum(words[b + field] for b in extra)

        totals = {
            "sent": total(S_SENT),
            "dropped": total(S_DROPPED),
            "replaced": total(S_REPLACED),
            "diverted": total(S_DIVERTED),
            "errors": total(S_ERRORS),
            "in_doubt": 0,
            "processes": used + len(extra),
        }
        if settle:
            # A process killed between publishing a record and counting it leaves the record in
            # its ring, uncounted: the listener saw more of its records than it counted.
            doubt = 0
            for base in [*range(start, stop, SLOT_WORDS), *extra]:
                published = words[base + S_SENT] - words[base + S_DROPPED] - words[base + S_DIVERTED]
                if words[base + S_SEEN] > published:
                    doubt += words[base + S_SEEN] - published
            totals["in_doubt"] = doubt
        return totals

    def snapshot(self) -> Dict[str, int]:
        snap = {name: self.words[i] for name, i in _INDEX.items()}
        snap.update(self.slot_totals())
        return snap


class Slot:
    """One process's counters: it alone writes them (its threads under ``lock``), except
    ``seen``, which the listener sets to the last record of the process's ring it committed.

    ``lock`` is re-entrant, and belongs to the slot because a slot belongs to one process: a
    forked child claims a slot of its own, and with it a lock no thread of its parent can hold.
    """

    __slots__ = ("words", "index", "base", "lock")

    def __init__(self, words: memoryview, index: int) -> None:
        self.words = words
        self.index = index
        self.base = HEADER_WORDS + SLOT_WORDS * index
        self.lock = threading.RLock()

    def get(self, offset: int) -> int:
        return self.words[self.base + offset]

    def add(self, offset: int, n: int = 1) -> None:
        self.words[self.base + offset] += n

    def set(self, offset: int, value: int) -> None:
        self.words[self.base + offset] = value

    def count(self, *offsets: int) -> None:
        """Count one record under each of ``offsets`` (the caller holds its process's lock)."""
        words, base = self.words, self.base
        for offset in offsets:
            words[base + offset] += 1


def settle_accounts(sent: int, written: int, dropped: int, diverted: int, counted_lost: int,
                    in_doubt: int) -> Dict[str, int]:
    """Close ``sent = written + dropped + diverted + lost`` once the pipe is drained.

    ``sent`` is counted right after a record is published in its ring; a writer killed in
    between leaves its record *in doubt*: in the ring (and written), but never counted as sent.
    Those, up to ``in_doubt``, are added to ``sent``. Whatever is still missing
    was lost without a counter seeing it (``unattributed``); a surplus no writer can explain
    (a foreign writer on the FIFO) is ``unexplained`` rather than hidden.
    """
    residual = written + dropped + diverted + counted_lost - sent
    recovered = min(max(residual, 0), in_doubt)
    sent += recovered
    missing = sent - written - dropped - diverted - counted_lost
    return {"sent": sent, "lost": counted_lost + max(missing, 0), "unattributed": max(missing, 0),
            "in_doubt_sent": recovered, "unexplained": max(-missing, 0)}
