"""One process's attachment to one service: its slot of the counters, its ring, its doorbell.

``Attachment`` claims them lazily, on the first record, and again in a forked child (which must
not share its parent's slot or ring); opens the ring when the first record needs it (no room
for it on the spool's filesystem: a full ring, the overflow policy's); hands the compiled
ring's ``publish``/``publish_record`` to the record path; and lets all of it go when the
service stops. It also answers what the process's ring says: ``wait_written`` (``flush()``),
``backlog``, ``full``, ``stopped``. ``Channel`` (``handler``) is the record path on top of it.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any, Callable, Dict, Optional

from . import process as _process
from .._common.counters import S_RING, S_SENT, STATE_STOPPED, Counters, Slot
from .._common.record import COMMON_KEYS, LEAN_KEYS, TAG_COMMON
from .._common.spool import _NO_ROOM, W_DONE, RingWriter, _process_start, open_ring_writer, ring_capacity
from .._common.worker_config import WorkerConfig
from .doorbell import SLEEPING, Doorbell

__all__ = ["Attachment"]

# publish() needs the GIL (see Channel.put_payload); a free-threaded build takes the Python path.
_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()


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
