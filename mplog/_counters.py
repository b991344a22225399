"""Shared counters: one small memory-mapped file that every process of a service can reach.

Accounting must survive any process being killed, so no counter is guarded by a lock another
process could die holding. Each process increments only its own *slot* (sent, dropped,
replaced); the listener owns the service fields (received, written, lost, ...); the main process
owns ``state``. A slot is claimed once per process under an ``fcntl`` lock, which the kernel
releases if the claimer dies. Readers sum the slots; a torn 8-byte read cannot happen on the
platforms we support (aligned 64-bit stores).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Dict

__all__ = ["Counters", "FIELDS", "SLOT_FIELDS", "STATE_NAMES"]

# Service fields, by index into the int64 array.
FIELDS = (
    "magic", "state", "received", "written", "pending", "full_start", "full_expected",
    "simp_start", "simp_expected", "torn", "malformed", "lost_listener", "last_write_ns",
    "flushed_token", "listener_pid", "slots_used", "replaced_listener", "stderr_records",
    "write_errors", "rotations", "pending_base", "error_ns", "reopens", "full_ino", "simp_ino",
    "syslog_connected", "syslog_forwarded", "syslog_dropped", "syslog_lost", "syslog_pending",
    "syslog_reconnects", "syslog_resets",
)
_INDEX = {name: i for i, name in enumerate(FIELDS)}
HEADER_WORDS = 64
_TEXT_WORD, _TEXT_BYTES = 40, 192  # words 40..63: the listener's last error, as UTF-8
SLOT_FIELDS = ("pid", "sent", "dropped", "replaced", "diverted", "writing")
SLOT_WORDS = 8
MAX_SLOTS = 1 << 16
_MAGIC = 0x6D706C6F67310001
_SIZE = 8 * (HEADER_WORDS + SLOT_WORDS * MAX_SLOTS)  # 4 MiB, sparse on tmpfs

STATE_STARTING, STATE_RUNNING, STATE_DEGRADED, STATE_STOPPING, STATE_STOPPED = range(5)
STATE_NAMES = ("starting", "running", "degraded", "stopping", "stopped")


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
    def claim_slot(self, pid: int) -> int:
        """Return the word offset of a fresh slot for ``pid``. Never reused: a dead process's
        counts stay in the sums."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 8, 8 * _INDEX["slots_used"], os.SEEK_SET)
        try:
            used = self.words[_INDEX["slots_used"]]
            if used >= MAX_SLOTS:
                slot = MAX_SLOTS - 1  # shared overflow slot: increments may race, documented
            else:
                slot = used
                self.words[_INDEX["slots_used"]] = used + 1
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 8, 8 * _INDEX["slots_used"], os.SEEK_SET)
        base = HEADER_WORDS + SLOT_WORDS * slot
        self.words[base] = pid
        return base

    def slot_totals(self) -> Dict[str, int]:
        used = min(self.words[_INDEX["slots_used"]], MAX_SLOTS)
        words = self.words
        start = HEADER_WORDS
        stop = HEADER_WORDS + SLOT_WORDS * used
        return {
            "sent": sum(words[start + 1:stop:SLOT_WORDS]),
            "dropped": sum(words[start + 2:stop:SLOT_WORDS]),
            "replaced": sum(words[start + 3:stop:SLOT_WORDS]),
            "diverted": sum(words[start + 4:stop:SLOT_WORDS]),
            "in_doubt": sum(words[start + 5:stop:SLOT_WORDS]),
            "processes": used,
        }

    def snapshot(self) -> Dict[str, int]:
        snap = {name: self.words[i] for name, i in _INDEX.items()}
        snap.update(self.slot_totals())
        return snap


def settle_accounts(sent: int, written: int, dropped: int, diverted: int, counted_lost: int,
                    in_doubt: int) -> Dict[str, int]:
    """Close ``sent = written + dropped + diverted + lost`` once the pipe is drained.

    ``sent`` is counted right after a record's first frame is in the pipe; a writer killed in
    between leaves its record *in doubt* (its slot's ``writing`` stays up): written, but never
    counted as sent. Those, up to ``in_doubt``, are added to ``sent``. Whatever is still missing
    was lost without a counter seeing it (``unattributed``); a surplus no writer can explain
    (a foreign writer on the FIFO) is ``unexplained`` rather than hidden.
    """
    residual = written + dropped + diverted + counted_lost - sent
    recovered = min(max(residual, 0), in_doubt)
    sent += recovered
    missing = sent - written - dropped - diverted - counted_lost
    return {"sent": sent, "lost": counted_lost + max(missing, 0), "unattributed": max(missing, 0),
            "in_doubt_sent": recovered, "unexplained": max(-missing, 0)}
