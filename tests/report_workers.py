"""Worker functions of tests/test_report.py (importable by spawn and forkserver children)."""

from __future__ import annotations

import logging


def storm(n: int) -> int:
    """A warning storm: ``n`` warnings of one template with different values."""
    log = logging.getLogger("t.storm")
    for i in range(n):
        log.warning("loss=%.6f at step %d for 'item-%d'", i / 7, i, i)
    return n
