"""The soak's group-SIGTERM phase: an application in a session of its own starts a
``LogService`` and workers, they all log as fast as the service takes it, and the soak sends
``os.killpg(pgid, SIGTERM)``. The application and its workers die of it at once, without
stopping the service; the listener (in a session of its own, so not signalled) must see its
parent go, write everything the spool holds and go last. ``verify_group`` then checks that
every record whose logging call returned is in the files exactly once.

The application is ``soak.py --_group-child SPEC`` (``group_child``), run by ``GroupRound``.
"""

from __future__ import annotations

import json
import logging
import mmap
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from _toolkit import Checks, cmdline, group_members, is_running, kill, mb
from soak_checks import Verification, record_message, record_size

import mplog

if TYPE_CHECKING:
    from soak import Soak

SOAK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak.py")
GROUP_NAME = "group"
GROUP_LOGGER = "soak.group"
GROUP_MIN_RECORDS = 300   # every process has logged this many before the signal
_PROGRESS = struct.Struct("=qq")  # calls returned, pid


class Progress:
    """How many logging calls of one process have returned, in a small shared file: a store into
    a MAP_SHARED mapping is in the page cache at once, so it survives the process's death."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, _PROGRESS.size)
            self._mm = mmap.mmap(fd, _PROGRESS.size)
        finally:
            os.close(fd)
        self.words = memoryview(self._mm).cast("q")
        self.words[1] = os.getpid()

    @staticmethod
    def read(path: str) -> Tuple[int, int]:
        try:
            with open(path, "rb") as f:
                data = f.read(_PROGRESS.size)
        except OSError:
            return 0, 0
        return _PROGRESS.unpack(data) if len(data) == _PROGRESS.size else (0, 0)


def group_log_loop(log: logging.Logger, pid_id: int, rnd: int, progress_path: str, big_every: int,
                   big_size: int, hard_deadline: float) -> None:
    """Log as fast as the service takes it until killed; count each call once it has returned."""
    progress = Progress(progress_path)
    words = progress.words
    seq = 0
    while True:
        size = record_size(seq, big_every, big_size)
        log.info(record_message(pid_id, rnd, seq, size))
        seq += 1
        words[0] = seq  # after the call returned
        if seq % 1000 == 0 and time.time() > hard_deadline:  # the soak is gone: never log forever
            return


def group_worker(cfg: Any, pid_id: int, rnd: int, progress_path: str, big_every: int, big_size: int,
                 hard_deadline: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die of it at once, as an application's worker does
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mplog.worker_init(cfg)
    group_log_loop(logging.getLogger(GROUP_LOGGER), pid_id, rnd, progress_path, big_every, big_size, hard_deadline)


def group_child(spec_json: str) -> int:
    """The application of one group-SIGTERM round: a session of its own (the soak started it so),
    a LogService, workers, and this process logging too, until the group is signalled."""
    spec = json.loads(spec_json)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec["start_method"] == "fork":
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    svc = mplog.LogService(spec["dir"], name=GROUP_NAME, shutdown_timeout=spec["shutdown_timeout"])
    svc.start()
    ctx = multiprocessing.get_context(spec["start_method"])
    n = spec["workers"]
    procs = []
    for wid in range(n):
        proc = ctx.Process(target=group_worker, name=f"group-w{wid}", daemon=True,
                           args=(svc.worker_config, wid, spec["round"], progress_path(spec["dir"], wid),
                                 spec["big_every"], spec["big_size"], spec["hard_deadline"]))
        proc.start()
        procs.append(proc)
    h = svc.health()
    info = {"pid": os.getpid(), "pgid": os.getpgid(0), "listener": h["listener"]["pid"],
            "spool": h["queue"]["spool"], "workers": [p.pid for p in procs]}
    tmp = spec["info"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, spec["info"])
    # This process is producer ``n``: the main process's ring must be written too.
    group_log_loop(logging.getLogger(GROUP_LOGGER), n, spec["round"], progress_path(spec["dir"], n),
                   spec["big_every"], spec["big_size"], spec["hard_deadline"])
    return 4  # only when the soak never signalled us: its verification then fails



def progress_path(directory: str, k: int) -> str:
    return os.path.join(directory, f"progress.{k}")


class GroupRound:
    """One round of the group-SIGTERM phase, run from the soak's main process."""

    def __init__(self, soak: "Soak", rnd: int) -> None:
        self.soak = soak
        self.rnd = rnd
        self.dir = os.path.join(soak.dir, f"group-{rnd}")
        self.info: Dict[str, Any] = {}
        self.producers = soak.args.group_workers + 1
        self.before: List[Tuple[int, int]] = []   # progress when the signal was sent
        self.after: List[Tuple[int, int]] = []    # progress once the group was gone
        self.started_ok = False
        self.error: Optional[str] = None
        self.t_signal = 0.0
        self.producers_gone_s: Optional[float] = None
        self.listener_gone_s: Optional[float] = None
        self.group_gone_s: Optional[float] = None
        self.survivors: List[str] = []
        self.child_rc: Optional[int] = None
        self.child_output = ""
        self.spool_left: Optional[bool] = None
        self.spool_listing: List[str] = []

    def progress(self) -> List[Tuple[int, int]]:
        """(calls returned, pid) of every producer, as their progress files hold it now."""
        return [Progress.read(progress_path(self.dir, k)) for k in range(self.producers)]

    def run(self) -> "GroupRound":
        a = self.soak.args
        rng = self.soak.rng
        os.makedirs(self.dir, exist_ok=True)
        info_path = os.path.join(self.dir, "info.json")
        spec = {"dir": self.dir, "round": self.rnd, "workers": a.group_workers, "start_method": a.start_method,
                "shutdown_timeout": a.shutdown_timeout, "big_every": a.big_every, "big_size": a.big_size,
                "info": info_path, "hard_deadline": time.time() + 300.0}
        out_path = os.path.join(self.dir, "application.out")
        with open(out_path, "wb") as out:
            popen = subprocess.Popen([sys.executable, SOAK_SCRIPT, "--_group-child", json.dumps(spec)],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        pgid = self.soak.group_pgid = popen.pid
        try:
            self._run(popen, pgid, info_path, rng)
        finally:
            if group_members(pgid):
                kill(pgid, group=True)
            try:
                self.child_rc = popen.wait(10.0)
            except subprocess.TimeoutExpired:
                pass
            self.soak.group_pgid = None
            try:
                with open(out_path, "rb") as f:
                    self.child_output = f.read().decode("utf-8", "replace")
            except OSError:
                pass
        return self

    def _run(self, popen: "subprocess.Popen[bytes]", pgid: int, info_path: str, rng: random.Random) -> None:
        a = self.soak.args
        say = self.soak.say
        # Up: the info file, then every producer past GROUP_MIN_RECORDS (bounded).
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and popen.poll() is None:
            if not self.info and os.path.exists(info_path):
                with open(info_path) as f:
                    self.info = json.load(f)
            if self.info and all(count >= GROUP_MIN_RECORDS for count, _pid in self.progress()):
                self.started_ok = True
                break
            time.sleep(0.05)
        if not self.started_ok:
            self.error = (f"the application did not get every process logging within 60 s (exit "
                          f"{popen.poll()}, progress {[count for count, _pid in self.progress()]})")
            say(f"group round {self.rnd}: {self.error}")
            return
        time.sleep(rng.uniform(0.5, 2.0))  # logging goes on, the rings fill up
        self.t_signal = time.monotonic()
        self.before = self.progress()
        os.killpg(pgid, signal.SIGTERM)
        producers = set(self.info["workers"]) | {self.info["pid"]}
        listener = self.info["listener"]
        limit = self.t_signal + a.shutdown_timeout + 20.0
        while True:
            if popen.poll() is not None and self.child_rc is None:
                self.child_rc = popen.returncode
            members = set(group_members(pgid))
            # The listener is in a session (and group) of its own: the signal does not reach it,
            # it sees its parent go. "Gone" is everything: the group and the listener.
            if is_running(listener):
                members.add(listener)
            now = time.monotonic() - self.t_signal
            if self.producers_gone_s is None and not members & producers:
                self.producers_gone_s = now
            if self.listener_gone_s is None and listener not in members:
                self.listener_gone_s = now
            if not members:
                self.group_gone_s = now
                break
            if time.monotonic() >= limit:
                self.survivors = [f"{pid} {cmdline(pid)}" for pid in sorted(members)]
                say(f"group round {self.rnd}: still running {a.shutdown_timeout + 20:.0f} s after the SIGTERM: "
                    f"{self.survivors}; killing the group")
                kill(pgid, group=True)
                kill(listener)
                break
            time.sleep(0.01)
        self.after = self.progress()
        spool = self.info.get("spool")
        self.spool_left = bool(spool) and os.path.exists(spool)
        if self.spool_left:
            try:
                self.spool_listing = sorted(os.listdir(spool))
            except OSError:
                pass
        say(f"group round {self.rnd}: SIGTERM to the group after {sum(c for c, _ in self.before):,} returned calls; "
            f"producers gone after {self.producers_gone_s} s, listener after {self.listener_gone_s} s, "
            f"group after {self.group_gone_s} s; spool {'LEFT' if self.spool_left else 'gone'}")


def verify_group(g: GroupRound) -> bool:
    """Check one round's files and its processes' ends, print them; True if all passed."""
    a = g.soak.args
    check = Checks()
    print()
    print("=" * 100)
    print(f"mplog group-SIGTERM round {g.rnd}: an application in its own session, {a.group_workers} workers "
          f"({a.start_method}) and its main process logging flat out; os.killpg(pgid, SIGTERM); logs in {g.dir}")
    check(g.started_ok, "every process of the application was logging when the group was signalled"
          + (f" ({g.error})" if g.error else ""))
    if not g.started_ok:
        return _report(check, g)
    pids = {(k, g.rnd): pid for k, (_count, pid) in enumerate(g.after)}
    v = Verification(pids, worker_logger=GROUP_LOGGER)
    full, simple = os.path.join(g.dir, f"{GROUP_NAME}.debug.log"), os.path.join(g.dir, f"{GROUP_NAME}.log")
    if os.path.exists(full):
        v.full_log(full)
    if os.path.exists(simple):
        v.simplified_log(simple)
    returned = [count for count, _pid in g.after]
    missing = beyond = 0
    examples: List[str] = []
    for k, count in enumerate(returned):
        _distinct, top = v.full.present((k, g.rnd))
        arr = v.full.counts.get((k, g.rnd), bytearray())
        below = v.full.present_below((k, g.rnd), count)
        missing += count - below
        if count - below and len(examples) < 5:
            first = next((i for i in range(count) if i >= len(arr) or not arr[i]), None)
            examples.append(f"process {k}: {count - below} of its {count} returned calls missing (first seq {first})")
        if top > count + 1:  # the call in flight when the signal came may be there or not
            beyond += 1
            examples.append(f"process {k}: seq {top - 1} in the file, {count} calls returned")
    in_flight = sum(1 for k, count in enumerate(returned) if v.full.present((k, g.rnd))[1] == count + 1)
    gone_within = a.shutdown_timeout + 20.0
    check(not g.survivors and g.group_gone_s is not None,
          f"every process of the group exited after the SIGTERM, within {gone_within:.0f} s (group gone after "
          f"{g.group_gone_s} s; survivors {g.survivors})")
    check(g.listener_gone_s is not None and g.producers_gone_s is not None and g.listener_gone_s >= g.producers_gone_s,
          f"the listener went last (producers gone after {g.producers_gone_s} s, listener after {g.listener_gone_s} s)")
    check(v.garbled == 0 and v.simple_garbled == 0,
          f"every block of the full log and line of the simplified log parses (garbled {v.garbled}, {v.simple_garbled})")
    check(v.bad_records == 0 and v.other_app == 0 and v.main_records == 0,
          f"every record is intact and from the process that logged it (bad {v.bad_records}, foreign "
          f"{v.other_app + v.main_records})")
    check(missing == 0, f"every record whose logging call returned is in the full log ({sum(returned):,} calls "
          f"returned; missing {missing})")
    check(v.full.dups == 0, f"no record twice in the full log (duplicates {v.full.dups}"
          + (": " + ", ".join(v.full.dup_examples) if v.full.dup_examples else "") + ")")
    check(beyond == 0, f"no record beyond the call in flight of each process ({beyond}; calls in flight that "
          f"reached the file: {in_flight} of {g.producers})")
    check(v.simple.dups == 0 and v.simple.same_as(v.full),
          f"the simplified log holds the same records ({v.simple.records:,} vs {v.full.records:,}; duplicates "
          f"{v.simple.dups})")
    summary_ok = (len(v.summaries) == 1 and v.summaries[0][0] == v.full.records and v.summaries[0][2] == 0
                  and v.summaries[0][1] == 0)
    check(set(v.death_pids.values()) <= {b"SIGTERM"} and v.simple_deaths == len(v.death_pids),
          f"the only ends recorded are the group's SIGTERM, in both logs ({len(v.death_pids)} records "
          f"{sorted(set(v.death_pids.values()))}, simplified lines {v.simple_deaths})")
    check(v.app_gone_notices == 1 and summary_ok and not v.other_notices and not v.restart_notices,
          f"the listener said the application exited without stopping it, and its one stop summary counts the "
          f"records in the file, 0 dropped, 0 lost (notices {v.app_gone_notices}, summaries {v.summaries} "
          f"{v.summary_hows} vs {v.full.records:,} in the file; other notices {len(v.other_notices) + v.restart_notices})")
    check(g.spool_left is False, f"the spool directory is gone ({g.info.get('spool')}: "
          + (f"still there, holding {g.spool_listing[:8]}" if g.spool_left else "gone") + ")")
    for e in examples + v.examples:
        print(f"  example: {e}")
    for n in v.other_notices[:5]:
        print(f"  other notice: {n}")
    print(f"returned calls per process {returned}; records in the full log {v.full.records:,} "
          f"({len(v.files)} files, {mb(sum(size for _p, size in v.files))}); application exit code {g.child_rc}")
    return _report(check, g)


def _report(check: Checks, g: GroupRound) -> bool:
    lines = [line for line in g.child_output.splitlines() if line.strip()]
    if lines:
        print(f"application output ({len(lines)} lines){':' if len(lines) <= 12 else ', the last 12:'}")
        for line in lines[-12:]:
            print(f"  | {line[:200]}")
    return check.report(f"RESULT (group round {g.rnd})")


