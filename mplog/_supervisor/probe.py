"""What health reads of the listener: its process as the supervisor sees it, its vitals, its
backlog, and whether the records are moving.

``ListenerProbe`` does not import psutil: the listener samples itself and publishes the figures
in the shared counters (see ``_listener.vitals.Vitals``), so that a forked worker does not map psutil
with the rest of its parent.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Tuple

from .._common.counters import Counters
from .process import ListenerProcess

__all__ = ["UNRESPONSIVE_AFTER", "ListenerProbe"]

# The listener samples itself once a second, from its loop: a sample older than this means the
# loop is stuck (a stalled file system, SIGSTOP) or starved of the CPU for that long.
UNRESPONSIVE_AFTER = 5.0
STALLED_AFTER = 2.0  # records waiting while nothing is written for this long: not healthy


class ListenerProbe:
    """The listener's part of a health report, from the counters and a ``ListenerProcess``."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._progress: Tuple[int, float] = (0, time.monotonic())  # (written, when it last moved)

    @staticmethod
    def absent() -> Dict[str, Any]:
        return {"pid": None, "alive": False, "status": "absent", "cpu_percent": None,
                "rss_bytes": None, "num_fds": None, "uptime_s": None}

    @staticmethod
    def seen(info: Dict[str, Any], proc: ListenerProcess) -> bool:
        """Our view of the process into ``info``: pid, uptime, whether it exited. Call it under
        the lock that the sentinel is closed under. Returns whether it is alive."""
        info["pid"] = proc.pid
        info["uptime_s"] = round(time.monotonic() - proc.started, 3)
        if proc.exited():
            info["status"] = "exited"
            return False
        info["alive"] = True
        return True

    def vitals(self, info: Dict[str, Any], pid: int) -> None:
        """The vitals listener ``pid`` published of itself, into ``info``."""
        c = self.counters
        sampled = c.get("vital_ns")
        if c.get("vital_pid") != pid or not sampled:  # its first sample comes before it is ready
            info["status"] = "starting"
            return
        age = max(0.0, time.time() - sampled / 1e9)
        info["status"] = "running" if age < UNRESPONSIVE_AFTER else "unresponsive"
        # -1: the listener could not measure it (see Vitals); 0: not known yet.
        cpu, rss, fds, created = (c.get(k) for k in ("vital_cpu_centi", "vital_rss", "vital_fds", "vital_create_us"))
        info["cpu_percent"] = cpu / 100 if cpu >= 0 else None
        info["rss_bytes"] = rss if rss >= 0 else None
        info["num_fds"] = fds if fds >= 0 else None
        info["create_time"] = created / 1e6 if created > 0 else None
        info["sample_age_s"] = round(age, 3)

    def backlog(self) -> int:
        """Records published in the rings and not yet written (or diverted) by the listener."""
        c = self.counters
        t = c.slot_totals()
        published = t["sent"] - t["dropped"] - t["diverted"]
        return max(0, published - c.get("written") - c.get("stderr_records") - c.get("torn"))

    def progress_stalled(self, written: int, waiting: int) -> bool:
        """Health is progress: records waiting while ``written`` has not moved for 2 s."""
        now = time.monotonic()
        last_written, since = self._progress
        if written != last_written or waiting <= 0:
            self._progress = (written, now)
            return False
        return now - since >= STALLED_AFTER
