"""Health: one JSON-serialisable report, computed from the shared counters and the supervisor.

``Health.report(supervisor)`` is what ``LogService.health()`` returns, what the supervisor writes
to ``<name>.health.json`` every ``health_interval`` seconds, and (``final=True``) the report that
``stop()`` returns. It reads; it never changes the service. The main process is the only one
that imports it; what psutil says of the listener comes from the listener (``_listener.vitals.Vitals``).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .._common.config import ServiceConfig
from .._common.counters import S_DEATH, S_DEATH_NS, S_PID, S_START, Counters, settle_accounts
from .._common.spool import RING_HEADER, filesystem, free_bytes
from .._common.deathword import start_wall, unpack  # not _exits: the listener's, see _deathword

if TYPE_CHECKING:  # pragma: no cover
    from .supervisor import Supervisor

__all__ = ["Health", "down_report", "workers_report"]

MAX_EXITS_SHOWN = 100  # the latest abnormal exits in a report; ``abnormal`` counts them all


def workers_report(counters: Counters, owner_pid: int) -> Dict[str, Any]:
    """``live``: processes of the service (but its main process) not seen to end;
    ``exited``: those that ended normally; ``abnormal``: how many did not, and
    ``abnormal_exits``: the latest of them, each with pid, name, cause (``SIGKILL(-9)``,
    ``EXIT(3)``, ``UNKNOWN``), when, how long it lived, and for a SIGKILL whether the OOM killer
    is confirmed (``oom``). From the slots: one strided read per column, no system call."""
    pids = counters.slot_column(S_PID)
    deaths = counters.slot_column(S_DEATH)
    live = exited = 0
    abnormal: List[int] = []
    for index, (pid, death) in enumerate(zip(pids, deaths)):
        if pid <= 0 or pid == owner_pid:
            continue
        if not death:
            live += 1
        elif unpack(death)["abnormal"]:
            abnormal.append(index)
        else:
            exited += 1
    exits = []
    for index in abnormal[-MAX_EXITS_SHOWN:]:
        slot = counters.slot(index)
        when = slot.get(S_DEATH_NS) / 1e9
        started = start_wall(slot.get(S_START))
        entry: Dict[str, Any] = {"pid": pids[index], "name": counters.slot_name(index), "time": round(when, 3),
                                 "lifetime_s": round(when - started, 2) if started else None}
        entry.update(unpack(deaths[index]))
        del entry["abnormal"]
        exits.append(entry)
    return {"live": live, "exited": exited, "abnormal": len(abnormal), "abnormal_exits": exits}

_STOPPED_LISTENER = {"pid": None, "alive": False, "status": "stopped", "cpu_percent": None,
                     "rss_bytes": None, "num_fds": None, "uptime_s": None}


def down_report(config: ServiceConfig) -> Dict[str, Any]:
    """The report of a service that never started."""
    return {"status": "down", "records": {"sent": 0, "written": 0, "dropped": 0, "lost": 0},
            "queue": {"depth": 0, "capacity": config.queue_size}}


class Health:
    def __init__(self, config: ServiceConfig, counters: Counters, runtime: str, ring_bytes: int) -> None:
        self.config = config
        self.counters = counters
        self.runtime = runtime
        self.ring_bytes = ring_bytes
        self._mount: Optional[Tuple[str, str]] = None  # the spool's mount point and type, looked up once
        self._diverted = (0, 0.0)  # records sent to stderr instead of the files, and when that last grew

    def diverted(self) -> int:
        """Records that went to stderr instead of the files: diverted by the processes (the
        service stopped or its spool gone under them) or by the listener (files unwritable)."""
        return self.counters.slot_totals()["diverted"] + self.counters.get("stderr_records")

    def diverting(self, diverted: int) -> Optional[float]:
        """Seconds since records last went to stderr, while that was within ``degraded_window``
        (None: not lately, or never)."""
        now = time.monotonic()
        last, since = self._diverted
        if diverted > last:
            self._diverted = (diverted, now)
            return 0.0
        if last and now - since < self.config.degraded_window:
            return now - since
        return None

    @property
    def main_create_time(self) -> Optional[float]:
        """This process's create_time as psutil tells it, which the listener looked up for us."""
        us = self.counters.get("main_create_us")
        return us / 1e6 if us else None

    def spool_usage(self) -> Dict[str, int]:
        """Rings and the memory their touched pages take (st_blocks: what tmpfs holds)."""
        rings = used = 0
        try:
            with os.scandir(self.runtime) as entries:
                for entry in entries:
                    if entry.name.startswith("ring."):
                        rings += entry.name[5:].isdigit()
                        used += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            pass
        return {"rings": rings, "bytes_used": used}

    def spool_room(self) -> Dict[str, Any]:
        """The spool's filesystem: where it is mounted, its type, its free bytes, and how many
        more full rings fit in them (rings reserve their pages as they fill: see _spool)."""
        if self._mount is None:
            self._mount = filesystem(self.runtime)
        free = free_bytes(self.runtime)
        ring_file = RING_HEADER + self.ring_bytes
        return {"path": self._mount[0], "type": self._mount[1], "free_bytes": free, "rings_free": free // ring_file}

    def report(self, supervisor: "Supervisor", final: bool = False) -> Dict[str, Any]:
        snap = self.counters.snapshot()
        totals = self.counters.slot_totals(settle=final)
        sent, written, dropped = totals["sent"], snap["written"], totals["dropped"]
        diverted = totals["diverted"] + snap["stderr_records"]
        counted_lost = snap["torn"] + snap["lost_listener"]
        published = sent - dropped - totals["diverted"]
        in_spool = max(0, published - written - snap["stderr_records"] - snap["torn"])
        unattributed = 0
        extra: Dict[str, int] = {}
        if final:
            settled = settle_accounts(sent, written, dropped, diverted, counted_lost, totals["in_doubt"])
            sent, lost, unattributed = settled["sent"], settled["lost"], settled["unattributed"]
            extra = {"in_doubt_sent": settled["in_doubt_sent"], "unexplained": settled["unexplained"]}
            if snap["final_set"]:
                # The listener's stop summary, exactly: a worker that logs after it is
                # diverted to stderr, and the summary in the file already stands.
                sent, written = snap["final_sent"], snap["final_written"]
                dropped, diverted, lost = snap["final_dropped"], snap["final_diverted"], snap["final_lost"]
                unattributed = max(0, lost - counted_lost)
            extra["kept_in_spool"] = in_spool if lost else 0
        else:
            lost = counted_lost
        listener = supervisor.listener_info() if not final else dict(_STOPPED_LISTENER)
        last_write_ns = snap["last_write_ns"]
        stalled = (not final) and supervisor.progress_stalled(written, in_spool)
        # Records going to stderr are not in the files: never "healthy" while that happens.
        to_stderr = None if final else self.diverting(diverted)
        if final or supervisor.state == "stopped":
            status = "down"
        elif (supervisor.degraded or stalled or not listener["alive"] or listener["status"] == "unresponsive"
              or snap["error_ns"] or to_stderr is not None):
            status = "degraded"
        else:
            status = "healthy"
        files = {}
        for key, path in (("simplified", self.config.simplified_path), ("full", self.config.full_path)):
            try:
                size: Optional[int] = os.stat(path).st_size
            except OSError:
                size = None
            files[key] = {"path": str(path), "size_bytes": size}
        usage = self.spool_usage() if not final else {"rings": 0, "bytes_used": 0}
        report: Dict[str, Any] = {
            "status": status,
            "state": supervisor.state,
            "service": {"pid": os.getpid(), "create_time": self.main_create_time, "name": self.config.name,
                        "directory": str(self.config.directory), "updated": time.time()},
            "listener": listener,
            "restarts": supervisor.restarts,
            "last_exit": supervisor.last_exit,
            # Capacity is per process: each has a ring of ``capacity`` records in
            # ``capacity_bytes``; ``bytes`` is the memory the spool's touched pages take now.
            "queue": {"depth": 0 if final else in_spool, "capacity": self.config.queue_size,
                      "capacity_bytes": self.ring_bytes, "scope": "per process",
                      "rings": usage["rings"], "bytes": usage["bytes_used"], "spool": self.runtime,
                      "filesystem": self.spool_room()},
            "records": {"sent": sent, "written": written, "dropped": dropped, "lost": lost,
                        "diverted": diverted, "torn": snap["torn"], "lost_with_listener": snap["lost_listener"],
                        "unattributed_lost": unattributed, "replaced": totals["replaced"] + snap["replaced_listener"],
                        "malformed_frames": snap["malformed"], "errors": totals["errors"],
                        "recovered": snap["recovered"], **extra},
            "rotations": snap["rotations"],
            "reopens": snap["reopens"],
            "last_write_age_s": (round(time.time() - last_write_ns / 1e9, 3) if last_write_ns else None),
            "files": files,
            "processes": totals["processes"],
            "workers": workers_report(self.counters, os.getpid()),
        }
        if self.config.syslog:
            report["syslog"] = {
                "host": self.config.syslog[0], "port": self.config.syslog[1],
                "connected": bool(snap["syslog_connected"]), "forwarded": snap["syslog_forwarded"],
                "dropped": snap["syslog_dropped"], "lost": snap["syslog_lost"], "pending": snap["syslog_pending"],
                "reconnects": snap["syslog_reconnects"], "resets": snap["syslog_resets"],
            }
        if snap["error_ns"]:
            report["last_error"] = {"message": self.counters.get_text(), "time": snap["error_ns"] / 1e9}
            report["reason"] = report["last_error"]["message"]
        if listener["status"] == "unresponsive":
            report["reason"] = f"the listener has not answered for {listener['sample_age_s']:.0f} s"
        if stalled:
            report["reason"] = "records are waiting and none was written for 2 s"
        if to_stderr is not None:
            report["reason"] = (f"{diverted} record(s) went to stderr instead of the files, the latest "
                                f"{to_stderr:.0f} s ago")
        elif not final and supervisor.last_exit and supervisor.last_exit.get("cause") and "reason" not in report:
            report["reason"] = f"the listener exited with {supervisor.last_exit['name']}: {supervisor.last_exit['cause']}"
        return report
