"""mplog's optional C module (``mplog/_speedups.c``) and the one switch that turns it off.

setup.py builds it where it can (``optional=True``). Each piece of it has a Python twin that
gives the same bytes (the ring's write and take in ``_spool``, the record's marshal in
``_record``, the listener's loop over common records in ``_listener.Batch``), used where it was
not built, or where ``MPLOG_PURE_PYTHON=1`` is in the environment of the process when it opens
a ring, makes a handler or starts a listener.
"""

from __future__ import annotations

import os
from typing import Any

speedups: Any = None
try:
    from .. import _speedups as speedups
except ImportError:  # pragma: no cover - depends on the install
    pass


def enabled() -> bool:
    """Whether what is opened or made now uses the compiled code."""
    return speedups is not None and not os.environ.get("MPLOG_PURE_PYTHON")
