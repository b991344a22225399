"""The health file: written atomically by the supervisor, read by ``python -m mplog health``.

``same_process`` and ``kernel_status`` are the CLI's: they import psutil, in a process of their
own, never in the service's (whose forked workers would map it too).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional

__all__ = ["kernel_status", "read_health_file", "same_process", "write_health_file"]


def write_health_file(path: Any, health: Dict[str, Any]) -> None:
    """Atomic replace, readable by all, writable by the owner only."""
    directory = os.path.dirname(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".health-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(health, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_health_file(path: Any) -> Dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("not a health report")
    return data


def same_process(pid: Any, create_time: Any) -> bool:
    """A pid is a process only together with its create_time (pids are reused)."""
    if not isinstance(pid, int) or not isinstance(create_time, (int, float)):
        return False
    import psutil  # the CLI's, a process of its own (never the service's)
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def kernel_status(pid: Any, create_time: Any) -> Optional[str]:
    """What the kernel says of a process (``stopped``, ``disk-sleep``...), if it is still the
    one that ``pid`` and ``create_time`` name; for the CLI, of a listener that stopped answering."""
    if not same_process(pid, create_time):
        return None
    import psutil
    try:
        status = psutil.Process(pid).status()
    except psutil.Error:
        return None
    return str(getattr(status, "value", status))
