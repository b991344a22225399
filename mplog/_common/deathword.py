"""The death word: how a process ended, in one int64 of its slot in the shared counters.

The listener's exit watch (``_listener.exits``) packs it; health, in the main process, unpacks it. It
lives apart from the watch so that the main process, which only reads it, does not import the
watch: every module the main process imports is in every forked worker's RSS (0.16 MB here).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, Optional

__all__ = ["K_EXIT", "K_SIGNAL", "K_UNKNOWN", "exit_cause", "pack", "start_wall", "unpack"]

# How a process ended: killed by a signal, exited with a status, or neither is known.
K_SIGNAL, K_EXIT, K_UNKNOWN = 1, 2, 3

_D_SET = 1 << 62
_D_ABNORMAL, _D_OOM_YES, _D_OOM_NO, _D_STACKS, _D_UNCAUGHT, _D_POOL = (1 << b for b in range(10, 16))

try:
    _CLK_TCK = os.sysconf("SC_CLK_TCK")
except (ValueError, OSError, AttributeError):  # pragma: no cover
    _CLK_TCK = 100


def start_wall(ticks: int) -> Optional[float]:
    """A process's start time (``/proc/<pid>/stat`` field 22: clock ticks after boot) as
    seconds since the epoch, to 1/CLK_TCK (10 ms). Not from /proc/stat's ``btime``, which is
    whole seconds: a worker that lived 50 ms would seem to have lived up to a second."""
    if not ticks:
        return None
    try:
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock starttime counts in
    except (AttributeError, OSError):  # pragma: no cover
        return None
    return time.time() - (since_boot - ticks / _CLK_TCK)


def exit_cause(kind: int, value: int) -> str:
    """``SIGKILL(-9)``, ``EXIT(3)``, ``UNKNOWN``: how loky and health name an end."""
    if kind == K_SIGNAL:
        try:
            return f"{signal.Signals(value).name}(-{value})"
        except ValueError:
            return f"SIGNAL(-{value})"
    if kind == K_EXIT:
        return f"EXIT({value})"
    return "UNKNOWN"


def pack(kind: int, value: int, *, normal: bool, oom: str, stacks: bool, uncaught: bool, pool_shutdown: bool) -> int:
    """The death word of an ending (``_listener.exits.Exit`` gives these): its kind and value,
    whether it was normal, the OOM verdict ("confirmed", "ruled out" or other), and whether it
    left crash stacks, an uncaught exception or ended in a pool's shutdown."""
    word = _D_SET | (kind << 8) | (value & 0xFF)
    if not normal:
        word |= _D_ABNORMAL
    if oom == "confirmed":
        word |= _D_OOM_YES
    elif oom == "ruled out":
        word |= _D_OOM_NO
    if stacks:
        word |= _D_STACKS
    if uncaught:
        word |= _D_UNCAUGHT
    if pool_shutdown:
        word |= _D_POOL
    return word


def unpack(word: int) -> Dict[str, object]:
    """The death word as health reports it: ``cause``, ``abnormal``, ``oom`` (for a SIGKILL:
    True confirmed, False ruled out, None unknown), ``stacks``, ``uncaught_exception``."""
    kind, value = (word >> 8) & 0x3, word & 0xFF
    out: Dict[str, object] = {"cause": exit_cause(kind, value), "abnormal": bool(word & _D_ABNORMAL)}
    if (kind == K_SIGNAL and value == signal.SIGKILL) or kind == K_UNKNOWN:
        out["oom"] = True if word & _D_OOM_YES else (False if word & _D_OOM_NO else None)
    out["stacks"] = bool(word & _D_STACKS)
    out["uncaught_exception"] = bool(word & _D_UNCAUGHT)
    return out
