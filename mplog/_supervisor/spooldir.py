"""``SpoolDirectory``: the spool of one service, from its making to its removal.

The spool is a directory ``mplog-<uid>-<key>-<random>`` on tmpfs (``XDG_RUNTIME_DIR`` or
``/dev/shm``), 0700, where ``key`` names the file set (directory and name): the counters, the
control FIFO, one ring per process, an ``owner`` file (pid and start time of the main
process) and ``worker.json``. A normal stop removes it; so does the listener when the
application dies without stopping. A spool that still holds unwritten records (everything was
SIGKILLed) is kept, and the next service on the same file set writes those records first: its
``leftovers``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Tuple

from .._app.handler import _service_read_fds
from .._common.config import ServiceConfig, WorkerConfig
from .._common.counters import Counters
from .._common.spool import (SPOOL_MAX_AGE_S, Placement, clean_spools, list_spools, remove_spool, spool_roots,
                             unwritten_records, write_owner)
from .._common.transport import FifoWriter
from .fileset import file_set_key

__all__ = ["SpoolDirectory"]


class SpoolDirectory:
    """A service's spool directory and what the main process holds open in it: the counters,
    a read end of the control FIFO, and a writer of control frames."""

    def __init__(self, path: str, leftovers: Tuple[str, ...]) -> None:
        self.path = path
        self.leftovers = leftovers  # spools of earlier runs of this file set, records unwritten
        self.fifo = os.path.join(path, "fifo")
        self.counters_path = os.path.join(path, "counters")
        self.counters: Optional[Counters] = None
        self._writer: Optional[FifoWriter] = None
        self._read_fd = -1

    @classmethod
    def make(cls, cfg: ServiceConfig, placement: Placement) -> "SpoolDirectory":
        """Clean abandoned spools, find this file set's leftovers, and make a new spool in
        ``placement.root``, owned by this process."""
        prefix = file_set_key(cfg)
        for place in spool_roots():
            clean_spools(SPOOL_MAX_AGE_S, place)  # abandoned spools of any run of this user
        # Spools of earlier runs of this file set that died with records unwritten (in any
        # root: an earlier run may have found other room).
        leftovers = tuple(s.path for s in list_spools(None, prefix) if not s.alive and s.unwritten)
        # Made under a name no other service looks at, then renamed once it has its owner
        # file: a concurrent start's cleaning must never take it for an orphan.
        staging = tempfile.mkdtemp(prefix="." + prefix, dir=placement.root)
        write_owner(staging, str(cfg.directory), cfg.name)
        spool = cls(os.path.join(placement.root, os.path.basename(staging)[1:]), leftovers)
        os.rename(staging, spool.path)
        return spool

    def open(self) -> Counters:
        """Make the control FIFO and the counters; hold a read end of the FIFO."""
        os.mkfifo(self.fifo, 0o600)
        self.counters = Counters.create(self.counters_path)
        # The main process holds a read end for the service's whole life, so writers can always
        # open the FIFO (control frames, the doorbell) while a killed listener is replaced.
        self._read_fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        _service_read_fds[self._read_fd] = os.getpid()
        return self.counters

    def open_writer(self) -> None:
        self._writer = FifoWriter(self.fifo)

    def publish(self, worker: WorkerConfig) -> None:
        """Write ``worker.json``: a ServiceHandler in another process of the application
        (dictConfig at module level under spawn) joins this service through this file."""
        with open(os.path.join(self.path, "worker.json"), "w") as f:
            f.write(worker.to_json())

    def send(self, kind: int, payload: bytes, deadline: Optional[float]) -> bool:
        """One control frame to the listener; False if it could not be written by ``deadline``."""
        writer = self._writer
        if writer is None:
            return False
        try:
            return writer.write_frames(kind, payload, deadline)
        except OSError:
            return False

    def close(self) -> Optional[str]:
        """Close what this process holds and remove the spool; return its path if it was kept
        instead, because it still holds records (a listener that could not drain in time):
        the next run on this file set writes them."""
        if self.counters is not None:
            # The supervisor and health read them no more: the final report is taken.
            self.counters.close()
            self.counters = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._read_fd >= 0:
            _service_read_fds.pop(self._read_fd, None)
            try:
                os.close(self._read_fd)
            except OSError:
                pass
            self._read_fd = -1
        if unwritten_records(self.path):
            return self.path
        remove_spool(self.path)
        return None
