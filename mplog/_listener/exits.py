"""How the service's processes end: the listener's watch over them, and the record it writes.

Data flow::

    a process claims a slot (pid, start time, name; _process) ──▶ ExitWatch.refresh: a pidfd
        for it, its memory cgroup's OOM counter, its captured-output FIFOs
    the pidfd is readable: the process ended ──▶ ExitWatch.status: its exit status, at once
        ──▶ the listener writes what its ring still holds, and what its FIFOs still hold
        ──▶ ExitWatch.collect: an Exit (status, the process's own marks, its crash stacks,
            lifetime, last record, OOM evidence) ──▶ describe: one record, in both logs
        ──▶ ExitWatch.mark: the slot's death word (_deathword), which health() reads

Only a parent can wait for its child, and a nested pool's grandchildren are not the main
process's children, so the exit status comes, in order, from:

1. the pidfd's exit information (``PIDFD_GET_INFO`` with ``PIDFD_INFO_EXIT``, Linux 6.15+): for
   any process we hold a pidfd for, once its parent has reaped it. No race;
2. ``/proc/<pid>/stat``'s exit code (field 52) while the process is a zombie, before its parent
   reaps it: the listener, woken by the pidfd, reads it within microseconds, racing the parent's
   ``waitpid`` (older kernels);
3. what the process left itself (``_process``): a clean exit (with its status, when it knew
   it), or a faulthandler dump that names a fatal signal;
4. otherwise: unknown. A process that ended without its clean exit, and without a crash stack,
   was killed by SIGKILL or called ``os._exit()``.

``os.waitid(P_PIDFD, fd, WEXITED | WNOWAIT)`` from the main process would give (2) for its own
children only, with the same race, so the listener, which sees every process, does it all.

A SIGKILL is usually the OOM killer's. It is confirmed when the ``oom_kill`` count of the
process's memory cgroup (v2 ``memory.events``, v1 ``memory.oom_control``) rose since it was
last looked at, and ruled out when that count is readable and did not rise.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import re
import select
import signal
import struct
import time
from typing import Deque, Dict, List, Optional, Tuple

from .._common.counters import (S_DEATH, S_DEATH_NS, S_LAST_NS, S_PID, S_PPID, S_START, S_WATCHED, S_WSTATE, W_CAPTURE,
                        W_FAULTS, X_CLEAN, X_CODE_KNOWN, X_CODE_SHIFT, X_UNCAUGHT, Counters)
from .._common.record import TAG_TEXT, Record, deserialize, make_record
from .._common.spool import MAX_LINE, STREAMS, process_alive
from .._common.deathword import K_EXIT, K_SIGNAL, K_UNKNOWN, exit_cause, pack, start_wall

__all__ = ["Exit", "ExitWatch", "Watched", "describe", "fault_signal", "OomCounter"]

# -- the kernel's view ---------------------------------------------------------------------------
_PIDFD_INFO_EXIT = 1 << 3
_PIDFD_INFO_SIZE = 64  # struct pidfd_info, version 0
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11  # _IOWR(PIDFS_IOCTL_MAGIC, 11, ...)
_EXIT_CODE_AT = 8 + 8 + 4 * 11  # mask, cgroupid, 11 ids: then __s32 exit_code
_PF_EXITING = 0x4  # /proc/<pid>/stat field 9: the process has begun to exit
_pidfd_info_works = True  # until the kernel says it has no such ioctl
_HAS_PIDFD = hasattr(os, "pidfd_open")


def proc_stat(pid: int) -> Optional[List[bytes]]:
    """The fields of ``/proc/<pid>/stat`` after the command name: [0] state, [1] ppid, [19]
    start time, [-1] exit code (field 52). None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pidfd_exit_status(fd: int) -> Optional[int]:
    """The wait status of the process behind ``fd`` once it has been reaped, from the pidfd
    itself (Linux 6.15+); None before that, or on older kernels."""
    global _pidfd_info_works
    if fd < 0 or not _pidfd_info_works:
        return None
    buf = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("<Q", buf, 0, _PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(fd, _PIDFD_GET_INFO, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            _pidfd_info_works = False
        return None
    mask = struct.unpack_from("<Q", buf, 0)[0]
    if not mask & _PIDFD_INFO_EXIT:
        return None
    return int(struct.unpack_from("<i", buf, _EXIT_CODE_AT)[0])


def zombie_exit_status(pid: int, start: int) -> Optional[int]:
    """The wait status of ``pid`` while it is a zombie (or being reaped: ``X``), if it is still
    the process that started at ``start`` ticks (``/proc/<pid>/stat`` field 52, Linux 3.5+)."""
    fields = proc_stat(pid)
    if fields is None or len(fields) < 50 or fields[0] not in (b"Z", b"X"):
        return None
    try:
        if start and int(fields[19]) != start:
            return None
        return int(fields[-1])
    except ValueError:
        return None


# -- the OOM killer's trace ----------------------------------------------------------------------
_mounts: Optional[Dict[str, Tuple[str, str]]] = None
_oom_files: Dict[str, Optional[str]] = {}  # /proc/<pid>/cgroup's text -> its oom_kill file


def _cgroup_mounts() -> Dict[str, Tuple[str, str]]:
    """{"v2": (root, mount point), "v1": (root, mount point)} for the memory controller
    (read once: mounts do not move under a running service)."""
    global _mounts
    if _mounts is not None:
        return _mounts
    found: Dict[str, Tuple[str, str]] = {}
    _mounts = found
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts, rparts = left.split(), right.split()
                if len(parts) < 5 or len(rparts) < 3:
                    continue
                root, point = parts[3], parts[4].replace("\\040", " ")
                if rparts[0] == "cgroup2":
                    found.setdefault("v2", (root, point))
                elif rparts[0] == "cgroup" and "memory" in rparts[2].split(","):
                    found.setdefault("v1", (root, point))
    except OSError:
        pass
    return found


def _oom_file(pid: int) -> Optional[str]:
    """The file holding the ``oom_kill`` count of ``pid``'s memory cgroup, if readable."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError:
        return None
    if text not in _oom_files:  # workers share their cgroup: look it up once
        if len(_oom_files) > 1000:
            _oom_files.clear()
        _oom_files[text] = _find_oom_file(text.splitlines())
    return _oom_files[text]


def _find_oom_file(lines: List[str]) -> Optional[str]:
    mounts = _cgroup_mounts()
    candidates = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and "v2" in mounts:
            candidates.append((mounts["v2"], path, "memory.events"))
        elif "memory" in controllers.split(",") and "v1" in mounts:
            candidates.append((mounts["v1"], path, "memory.oom_control"))
    for (root, point), path, name in candidates:
        if root != "/" and (path == root or path.startswith(root + "/")):
            path = path[len(root):]
        full = os.path.join(point, path.lstrip("/"), name)
        if read_oom_kills(full) is not None:
            return full
    return None


def read_oom_kills(path: str) -> Optional[int]:
    """The ``oom_kill`` count in a cgroup's ``memory.events`` (v2) or ``memory.oom_control``
    (v1), or None if it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


class OomCounter:
    """One cgroup's ``oom_kill`` count: each rise explains one SIGKILL, once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.accounted = read_oom_kills(path) or 0  # kills already explained (or before us)

    def explain_sigkill(self) -> Tuple[str, int]:
        """("confirmed", count) if the count rose since; ("ruled out", count) if it did not;
        ("unknown", -1) if it cannot be read. No wait is needed: the kernel raises the count
        before it sends the signal (mm/oom_kill.c, "Raise event before sending signal")."""
        now = read_oom_kills(self.path)
        if now is None:
            return "unknown", -1
        if now > self.accounted:
            self.accounted += 1
            return "confirmed", now
        return "ruled out", now


# -- faulthandler's dump -------------------------------------------------------------------------
_FATAL = {"Segmentation fault": signal.SIGSEGV, "Aborted": signal.SIGABRT, "Bus error": signal.SIGBUS,
          "Floating point exception": signal.SIGFPE, "Illegal instruction": signal.SIGILL}
_FAULT_MAX = 256 * 1024


def fault_signal(text: str) -> Optional[int]:
    """The signal a faulthandler dump names in its first line (``Fatal Python error: ...``)."""
    m = re.match(r"Fatal Python error: ([^\n]+)", text)
    if m is None:
        return None
    sig = _FATAL.get(m.group(1).strip())
    return int(sig) if sig is not None else None


def read_fault(runtime: str, slot: int) -> str:
    try:
        with open(os.path.join(runtime, f"fault.{slot}"), "rb") as f:
            data = f.read(_FAULT_MAX)
    except OSError:
        return ""
    return data.decode("utf-8", "backslashreplace").rstrip("\n")


# -- the last record -----------------------------------------------------------------------------
_HEAD = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3})\] \[([^\]]*)\]")


def payload_summary(payload: bytes) -> Optional[Tuple[float, str]]:
    """(when it was logged, "[LEVEL] first line of its message") of a record payload."""
    try:
        rec = deserialize(payload)
        if rec[0] == TAG_TEXT:
            full = rec.full.decode("utf-8", "replace")
            m = _HEAD.match(full)
            if m is None:
                return None
            d = m.group(1)  # local time, as the formatter wrote it (strptime costs 60 us)
            created = time.mktime((int(d[0:4]), int(d[5:7]), int(d[8:10]), int(d[11:13]), int(d[14:16]),
                                   int(d[17:19]), 0, 0, -1)) + int(m.group(2)) / 1000
            at = full.find("\n  Message: ")
            msg = full[at + 12:full.find("\n", at + 12)] if at >= 0 else ""
            return created, f"[{m.group(3)}] {msg}"
        return float(rec.created), f"[{rec.levelname}] {str(rec.msg).split(chr(10), 1)[0]}"
    except Exception:
        pass
    return None


# -- one process's end ---------------------------------------------------------------------------
class _Plain:
    """A mutable record with a readable repr. Not a dataclass: dataclasses bring inspect, ast and
    dis (1 MB) into the process that imports them (see _config)."""

    __slots__: Tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


class Watched(_Plain):
    """A process the listener watches: from its slot, and what the listener opened for it."""

    __slots__ = ("slot", "pid", "start", "name", "ppid", "fd", "oom", "fifos", "unseen")

    def __init__(self, slot: int, pid: int, start: int, name: str, ppid: int = 0) -> None:
        self.slot = slot
        self.pid = pid
        self.start = start
        self.name = name
        self.ppid = ppid
        self.fd = -1  # its pidfd
        self.oom: Optional[OomCounter] = None
        self.fifos: List[Tuple[int, str, int]] = []  # (fd, logger, level)
        self.unseen = False  # gone when the listener first looked at its slot


class Exit(_Plain):
    """Everything known about how one process ended."""

    __slots__ = ("pid", "name", "status", "wstate", "started", "ended", "fault", "last", "oom", "oom_file",
                 "collateral_of", "unseen", "kind", "value", "core")

    def __init__(self, pid: int, name: str, status: Optional[int], wstate: int, started: Optional[float],
                 ended: float, fault: str = "", unseen: bool = False,
                 last: Optional[Tuple[float, str]] = None) -> None:
        self.pid = pid
        self.name = name
        self.status = status  # the kernel's wait status, if known
        self.wstate = wstate  # the process's own word (_process)
        self.started = started
        self.ended = ended
        self.fault = fault  # faulthandler's dump
        self.unseen = unseen  # it was gone when the listener first looked (no pidfd, no status)
        self.last = last  # the last record it logged: when, and what
        self.oom: Tuple[str, int] = ("", -1)  # for a SIGKILL (or an unknown end): OomCounter's verdict
        self.oom_file = ""
        self.collateral_of = 0  # a SIGTERM right after a sibling died: the pid of that sibling
        self.kind = K_UNKNOWN
        self.value = 0
        self.core = False

    def death_word(self) -> int:
        """This end as the slot's death word, which health() reads (``_common.deathword``)."""
        return pack(self.kind, self.value, normal=self.normal, oom=self.oom[0], stacks=bool(self.fault),
                    uncaught=bool(self.wstate & X_UNCAUGHT), pool_shutdown=self.pool_shutdown)

    def classify(self) -> "Exit":
        st = self.status
        if st is not None:
            if st & 0x7F:
                self.kind, self.value, self.core = K_SIGNAL, st & 0x7F, bool(st & 0x80)
            else:
                self.kind, self.value = K_EXIT, (st >> 8) & 0xFF
        elif self.fault and fault_signal(self.fault):
            self.kind, self.value = K_SIGNAL, fault_signal(self.fault) or 0
        elif self.wstate & X_UNCAUGHT:
            self.kind, self.value = K_EXIT, 1
        elif self.wstate & X_CLEAN:
            code = (self.wstate >> X_CODE_SHIFT) & 0xFF if self.wstate & X_CODE_KNOWN else 0
            self.kind, self.value = K_EXIT, code
        else:
            self.kind, self.value = K_UNKNOWN, 0
        return self

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.value).name
        except ValueError:
            return f"signal {self.value}"

    @property
    def pool_shutdown(self) -> bool:
        """A multiprocessing.Pool worker ended by SIGTERM: the pool's terminate() (the end of a
        ``with Pool()`` block), its documented way of stopping its workers."""
        return self.kind == K_SIGNAL and self.value == signal.SIGTERM and "PoolWorker" in self.name

    @property
    def normal(self) -> bool:
        if self.kind == K_EXIT:
            return self.value == 0
        if self.kind == K_SIGNAL:
            # Killed while it was already exiting normally (a pool tearing down), or its pool's
            # own shutdown.
            stop = self.value in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP)
            return self.pool_shutdown or (stop and bool(self.wstate & X_CLEAN))
        return False

    @property
    def cause(self) -> str:
        """``SIGKILL(-9)``, ``EXIT(3)``, ``UNKNOWN``: how loky and health name an end."""
        return exit_cause(self.kind, self.value)


_CRASH = {signal.SIGSEGV: "segmentation fault", signal.SIGABRT: "abort", signal.SIGBUS: "bus error",
          signal.SIGFPE: "arithmetic error", signal.SIGILL: "illegal instruction"}
_STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _seconds(s: float) -> str:
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _oom_text(e: Exit) -> str:
    verdict, count = e.oom
    if verdict == "confirmed":
        return f"confirmed: its cgroup's oom_kill count rose to {count}"
    if verdict == "ruled out":
        return "not this time: its cgroup's oom_kill count did not rise"
    return "not confirmed: no readable cgroup memory.events"


def describe(e: Exit) -> Tuple[Optional[int], str, Dict[str, str], Optional[str]]:
    """(level, message, context, body) of the record for ``e``; level None: nothing to write
    (a normal exit). The message is one line: the simplified log's; the full log adds the
    context and, after a crash, the stacks of its threads (the body)."""
    if e.normal and not e.pool_shutdown:
        return None, "", {}, None
    who = f"{e.name or 'process'} (pid {e.pid})"
    level = logging.ERROR
    if e.kind == K_SIGNAL:
        sig, name = e.value, e.signal_name
        core = " (core dumped)" if e.core else ""
        if sig == signal.SIGKILL:
            how = "was killed by SIGKILL"
            hint = f"the OOM killer is the usual sender ({_oom_text(e)})"
        elif sig in _CRASH:
            how = f"crashed with {name} ({_CRASH[signal.Signals(sig)]}){core}"
            hint = ("the Python stacks of its threads are in the full log" if e.fault
                    else "no Python stack was left (faulthandler was not watching it)")
        elif sig in _STOP:
            level = logging.WARNING
            how = f"was stopped by {name}"
            if e.pool_shutdown:
                level = logging.DEBUG
                hint = "its pool's terminate(), as at the end of a `with Pool()` block"
            elif e.collateral_of:
                hint = f"its pool stopping its workers after pid {e.collateral_of} died"
            else:
                hint = "sent by a pool shutting down, a scheduler, or kill"
        else:
            how = f"was killed by {name}{core}"
            hint = "a signal it did not handle"
    elif e.kind == K_EXIT:
        how = f"exited with status {e.value}"
        hint = ("after an uncaught exception (logged before this)" if e.wstate & X_UNCAUGHT
                else "sys.exit() or os._exit() with that status")
    elif e.unseen:
        how = "ended before the listener could watch it, without a clean exit (exit status unknown)"
        hint = f"so a signal or os._exit(); the OOM killer is the usual sender of a SIGKILL ({_oom_text(e)})"
    else:
        how = "ended without a clean exit (exit status unknown)"
        hint = f"so a SIGKILL or os._exit(); the OOM killer is the usual sender of a SIGKILL ({_oom_text(e)})"
    lifetime = e.ended - e.started if e.started else None
    life = f" after {_seconds(max(lifetime, 0.0))}" if lifetime is not None else ""
    if e.last is not None:
        ago = max(0.0, e.ended - e.last[0])
        last = f"its last record was logged {_seconds(ago)} before ({_clock(e.last[0])})"
    else:
        last = "it logged no record"
    message = f"{who} {how}{life}; {hint}; {last}"
    context = {"exit": e.cause}
    if e.started:
        context["lifetime"] = f"{_seconds(max(e.ended - e.started, 0.0))} (started {_clock(e.started)})"
    if e.last is not None:
        context["last_record"] = f"{_clock(e.last[0])} {e.last[1][:200]}"
    if e.oom[0]:
        context["oom_kill"] = f"{e.oom[0]} ({e.oom_file or 'no cgroup file'})"
    return level, message, context, (e.fault or None)


# -- the watch -----------------------------------------------------------------------------------
class ExitWatch:
    """Every process with a slot in the service's counters (but the main process that owns
    it), watched through a pidfd from the moment the listener sees its slot."""

    def __init__(self, counters: Counters, runtime: str, owner_pid: int) -> None:
        self.counters = counters
        self.runtime = runtime
        self.owner_pid = owner_pid
        self.by_fd: Dict[int, Watched] = {}
        self.by_slot: Dict[int, Watched] = {}
        self._scanned = 0
        self._oom: Dict[str, OomCounter] = {}
        self._recent: Deque[Tuple[float, int, int]] = collections.deque(maxlen=64)  # (when, ppid, pid)

    def refresh(self) -> Tuple[List[int], List[Watched]]:
        """Watch the processes that claimed a slot since the last look. Returns the new
        pidfds (for the listener's poll) and the processes already gone when first seen."""
        c = self.counters
        used = c.slots_used
        fds: List[int] = []
        gone: List[Watched] = []
        for index in range(self._scanned, used):
            slot = c.slot(index)
            pid = slot.get(S_PID)
            if pid <= 0 or pid == self.owner_pid or slot.get(S_DEATH):
                continue  # the service's owner, a slot not in use, or an end already written
            w = Watched(index, pid, slot.get(S_START), c.slot_name(index), ppid=slot.get(S_PPID))
            self.by_slot[index] = w
            try:
                w.fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
            except (AttributeError, OSError):
                w.fd = -1
            fields = proc_stat(pid)
            same = fields is not None and len(fields) > 19 and (not w.start or int(fields[19]) == w.start)
            if fields is not None and same:
                path = _oom_file(pid)
                if path is not None:
                    w.oom = self._oom.get(path) or self._oom.setdefault(path, OomCounter(path))
            if w.fd >= 0 and same:
                self.by_fd[w.fd] = w
                fds.append(w.fd)
                slot.set(S_WATCHED, 1)  # worker_init waits for this
            elif not _HAS_PIDFD and process_alive(pid, w.start):
                slot.set(S_WATCHED, 1)  # no pidfds here (not Linux): looked at once a second
            else:  # already gone (its pid maybe reused): nothing to wait for
                if w.fd >= 0:
                    os.close(w.fd)
                    w.fd = -1
                w.unseen = True
                gone.append(w)
        self._scanned = used
        self.open_fifos()
        return fds, gone

    def unpolled_ended(self) -> List[Watched]:
        """Without pidfds (not Linux): the watched processes found gone (once a second)."""
        if _HAS_PIDFD:
            return []
        return [w for w in list(self.by_slot.values()) if w.fd < 0 and not process_alive(w.pid, w.start)]

    @property
    def behind(self) -> bool:
        """Slots were claimed since the last look (one word read: cheap enough per loop)."""
        return self.counters.slots_used > self._scanned

    def open_fifos(self) -> None:
        """Hold a read end of the FIFOs of processes that capture their output, so what they
        wrote and did not read themselves outlives them (read only after their death)."""
        for w in self.by_slot.values():
            if w.fifos or not self.counters.slot(w.slot).get(S_WSTATE) & W_CAPTURE:
                continue
            for _fd, tag, logger, level in STREAMS:
                try:
                    fd = os.open(os.path.join(self.runtime, f"{tag}.{w.slot}"),
                                 os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
                except OSError:
                    continue
                w.fifos.append((fd, logger, level))

    def ready(self, timeout_ms: int = 0) -> List[Watched]:
        """The watched processes that have ended (polling their pidfds)."""
        if not self.by_fd:
            return []
        p = select.poll()
        for fd in self.by_fd:
            p.register(fd, select.POLLIN)
        return [self.by_fd[fd] for fd, _ev in p.poll(timeout_ms) if fd in self.by_fd]

    def wait_dying(self, ppids: "set[int]", known: "set[Watched]", deadline: float) -> List[Watched]:
        """Watched children of ``ppids`` that are exiting now (``PF_EXITING``: killed, their
        memory still being freed), once they have ended, or by ``deadline``."""
        dying = []
        for w in self.by_fd.values():
            if w in known or w.ppid not in ppids:
                continue
            fields = proc_stat(w.pid)
            try:
                if fields is None or fields[0] in (b"Z", b"X") or int(fields[6]) & _PF_EXITING:
                    dying.append(w)
            except (IndexError, ValueError):
                pass
        ended: List[Watched] = []
        while dying:
            p = select.poll()
            for w in dying:
                p.register(w.fd, select.POLLIN)
            left = deadline - time.monotonic()
            ready = {fd for fd, _ev in p.poll(max(0, int(left * 1000)))} if left > 0 else set()
            if not ready:
                break
            ended += [w for w in dying if w.fd in ready]
            dying = [w for w in dying if w.fd not in ready]
        return ended

    def status(self, w: Watched) -> Optional[int]:
        """The ended process's wait status: from the pidfd (reaped), else from /proc (zombie),
        else from the pidfd again (reaped in between). Call it first: a zombie may be reaped
        at any moment."""
        deadline = time.monotonic() + 0.05
        while True:
            st = pidfd_exit_status(w.fd)
            if st is None:
                st = zombie_exit_status(w.pid, w.start)
            if st is None:
                st = pidfd_exit_status(w.fd)
            # Being reaped right now: the parent has taken the zombie and the pidfd's exit
            # information is set a moment later (release_task). A bounded retry.
            if st is not None or not _pidfd_info_works or w.fd < 0 or time.monotonic() >= deadline:
                return st
            time.sleep(0.001)

    def leftovers(self, w: Watched) -> List[Record]:
        """What the process wrote to its captured stdout/stderr and never read itself: one
        record per line, attributed to it."""
        self.open_fifos()
        out: List[Record] = []
        now = time.time()
        for fd, logger, level in w.fifos:
            data = b""
            while len(data) < 16 * MAX_LINE:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
            for line in data.split(b"\n") if data else []:
                if not line and data.endswith(b"\n"):
                    continue
                text = line.rstrip(b"\r").decode("utf-8", "backslashreplace")
                out.append(make_record(now, level, logger, text, pathname=f"<{logger}>", funcName="<capture>",
                                       processName=w.name, process=w.pid, threadName="-"))
        return out

    def collect(self, w: Watched, status: Optional[int], last: Optional[bytes]) -> Exit:
        slot = self.counters.slot(w.slot)
        wstate = slot.get(S_WSTATE)
        e = Exit(pid=w.pid, name=w.name, status=status, wstate=wstate, started=start_wall(w.start),
                 ended=time.time(), fault=read_fault(self.runtime, w.slot) if wstate & W_FAULTS else "",
                 unseen=w.unseen and status is None)
        if last is not None:
            e.last = payload_summary(last)
        if e.last is None and slot.get(S_LAST_NS):
            e.last = (slot.get(S_LAST_NS) / 1e9, "")
        e.classify()
        if (e.kind == K_SIGNAL and e.value == signal.SIGKILL) or e.kind == K_UNKNOWN:
            if w.oom is not None:
                e.oom = w.oom.explain_sigkill()
                e.oom_file = w.oom.path
            else:
                e.oom = ("unknown", -1)
        if e.kind == K_SIGNAL and e.value == signal.SIGTERM and w.ppid:
            for when, ppid, pid in reversed(self._recent):
                if ppid == w.ppid and e.ended - when < 5.0:
                    e.collateral_of = pid
                    break
        if not e.normal and not (e.kind == K_SIGNAL and e.value in _STOP):
            self._recent.append((e.ended, w.ppid, w.pid))
        return e

    def mark(self, w: Watched, e: Exit) -> None:
        """The end is written: record it in the slot (health, and a listener started later),
        and let go of what was opened for the process."""
        slot = self.counters.slot(w.slot)
        slot.set(S_DEATH_NS, int(e.ended * 1e9))
        slot.set(S_DEATH, e.death_word())
        self.forget(w)
        names = (["fault"] if e.wstate & W_FAULTS else []) + (["out", "err"] if e.wstate & W_CAPTURE else [])
        for name in names:
            try:
                os.unlink(os.path.join(self.runtime, f"{name}.{w.slot}"))
            except OSError:
                pass

    def forget(self, w: Watched) -> None:
        if w.fd >= 0:
            self.by_fd.pop(w.fd, None)
            try:
                os.close(w.fd)
            except OSError:
                pass
            w.fd = -1
        for fd, _logger, _level in w.fifos:
            try:
                os.close(fd)
            except OSError:
                pass
        w.fifos = []
        self.by_slot.pop(w.slot, None)

    def stamp(self, slot: int, payload: bytes) -> None:
        """Keep when the process's latest written record was logged, for a listener that
        starts after this one (once a second, not per record)."""
        summary = payload_summary(payload)
        if summary is not None:
            self.counters.slot(slot).set(S_LAST_NS, int(summary[0] * 1e9))

    def close(self) -> None:
        for w in list(self.by_slot.values()):
            self.forget(w)
