"""A pool task that imports nothing of mplog (tests/workers.py does): what a worker costs
without the service, to compare with one that has it (test_spool)."""

from __future__ import annotations

import logging


def private_rss_kb(n: int = 0) -> int:
    """Log ``n`` records, then return this process's private memory (RssAnon + RssFile, kB):
    what it costs beyond the shared pages of the spool's ring."""
    log = logging.getLogger("t.rss")
    for i in range(n):
        log.info("record %d of %d", i, n)
    kb = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                kb += int(line.split()[1])
    return kb
