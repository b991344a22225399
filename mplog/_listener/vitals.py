"""The listener's own figures for health (``Vitals``): its CPU, memory and descriptors, sampled
with psutil about once a second into the shared counters, where the supervisor reads them."""

from __future__ import annotations

import os
import time
from typing import Any

from .._common.counters import Counters

__all__ = ["Vitals"]


class Vitals:
    """The listener's own figures for health, sampled with psutil about once a second and
    published in the shared counters, where the supervisor reads them.

    The main process does not import psutil: a forked worker maps whatever its parent had, and
    psutil was 1.0 MB of every one. A listener that stops sampling (stopped, or stuck in a write
    to a stalled file system) is what health calls unresponsive; the CLI, a process of its own,
    asks psutil what the kernel says of it. Nothing here may stop the listener: without psutil's
    figures a sample still says that the loop runs.
    """

    EVERY = 1.0

    def __init__(self, counters: Counters, parent_pid: int) -> None:
        self.counters = counters
        self.last = 0.0
        self.ps: Any = None
        try:
            import psutil  # the listener's only use of it, on its main thread before any other starts
            self.ps = psutil.Process()
            self.ps.cpu_percent(None)  # the first reading is meaningless: take and discard it
            counters.set("vital_create_us", int(self.ps.create_time() * 1e6))
            # The service's identity in its health file (pid + create_time), for the CLI.
            counters.set("main_create_us", int(psutil.Process(parent_pid).create_time() * 1e6))
        except Exception:  # noqa: B902 - no psutil, no /proc, a parent already gone: fewer figures
            pass
        self.sample(time.monotonic())

    def sample(self, now: float) -> None:
        if now - self.last < self.EVERY:
            return
        self.last = now
        c = self.counters
        figures = (-1, -1, -1)
        if self.ps is not None:
            try:
                with self.ps.oneshot():
                    figures = (int(self.ps.cpu_percent(None) * 100), self.ps.memory_info().rss,
                               self.ps.num_fds() if hasattr(self.ps, "num_fds") else -1)
            except Exception:  # out of fds, /proc unreadable: this sample has no figures
                pass
        c.set("vital_cpu_centi", figures[0])
        c.set("vital_rss", figures[1])
        c.set("vital_fds", figures[2])
        c.set("vital_pid", os.getpid())
        c.set("vital_ns", time.time_ns())  # last: it dates the figures above

