#!/usr/bin/env python3
"""Soak test: N workers log at a steady rate for a long time while the listener and workers are
SIGKILLed at random and the files are rotated; then every record in every file is verified and
the service's accounting is checked against the files.

    python scripts/soak.py                        # 10 minutes, 8 workers x 500 records/s
    python scripts/soak.py --duration 60          # the short one, for CI
    python scripts/soak.py --duration 120 --kill-listener-every 10 --seed 7 --keep
    python scripts/soak.py --duration 60 --group-sigterm 3   # three group-SIGTERM rounds at the end

What runs:

* ``--workers`` plain ``multiprocessing.Process`` workers (``--start-method``, default
  forkserver) call ``mplog.worker_init(cfg)`` and log ``--rate`` records/s each, paced, with
  unique and self-checking messages ``w{id}.{gen} seq {i} len {n} chk {crc32} {body}``
  (every ``--big-every``-th record has a body of ``--big-size`` characters: a big entry in the
  worker's ring). ``gen`` counts the replacements of worker ``id``. Each worker reports how many
  records it has logged to its own small file every 100 records (atomic replace) and when it
  stops; a SIGKILLed worker's true count is between its last report and 100 more.
* The main process SIGKILLs the listener every ``--kill-listener-every`` s and a random worker
  every ``--kill-worker-every`` s (both with random jitter, x0.5..x1.5) and replaces the
  worker; every ``--rotate-every`` s (a shorter run: once, at half-time) it rotates the logs
  like logrotate's ``create`` mode (rename both files to ``.<k>``, create empty ones,
  ``svc.reopen()``). It logs one
  ``main event`` record per action. Every 5 s it prints a status line.
* At the end: workers are stopped (stop file, bounded join), ``svc.flush()``,
  ``final = svc.stop()``. Then every full log (rotated and current) is parsed block by block
  and every simplified log line by line, and these are checked (PASS/FAIL each; exit 1 on any
  FAIL):

    - every block and line parses, every worker record is intact (body, CRC, the pid of the
      worker that logged it), no record appears twice, none beyond what its worker logged;
    - application records in the full logs == ``written``; the simplified logs hold exactly the
      same records;
    - ``sent == written + dropped + diverted + lost`` and
      ``lost == torn + lost_with_listener + unattributed_lost``, with ``unattributed_lost == 0``
      (every loss is a counted loss);
    - a listener kill loses nothing (the records wait in the spool, and the rings' tails move
      only after a batch is in the files): every restart notice says "0 records lost",
      ``lost_with_listener == 0`` and ``lost == 0``; one notice per restart; one restart per
      listener kill; the stop summary's count == ``written``;
    - ``sent`` agrees with the workers' own reports; the records missing from the files (below
      a killed worker's last report or its highest record in the files, below a clean worker's
      count) are no more than ``lost + dropped + diverted``;
    - no worker died that we did not kill; ``flush()`` before stop returned True;
    - the listener's and the main process's fd counts did not grow; the listener reopened both
      files at every rotation (health ``reopens``, which counts over listener restarts);
    - the spool holds no ring of a dead worker at the end (the rings of killed workers are
      retired), and the spool directory is gone after ``stop()``.

* Then ``--group-sigterm`` rounds (default 1; 0: none) of the group-SIGTERM phase: a child
  application in a session of its own (``start_new_session=True``) starts a ``LogService``
  and ``--group-workers`` worker processes (``--start-method``), and it and its workers log as
  fast as they can (``overflow="block"``: the rings fill up and callers wait), each process
  storing in a small shared file, after each logging call returns, how many have returned.
  Once every process has logged a few hundred records (and a random 0.5-2 s more),
  ``os.killpg(pgid, SIGTERM)``: the application and its workers die of it at once, without
  stopping the service; the listener (in a session of its own, so not signalled) must see its
  parent go, write everything the spool holds and go last.
  Checked per round: the whole group and the listener are gone within ``--shutdown-timeout`` + 20 s; every
  record whose logging call returned is in the full log exactly once (at most the one call in
  flight per process beyond that), intact and from the right pid; the simplified log holds the
  same records; the listener said the application exited without stopping the service, and
  its stop summary counts exactly the records in the file, 0 lost; the spool directory is gone.

It never hangs: every wait is bounded, a watchdog ends the run (exit 3) if the run and stop
phases overrun by minutes, and every child is killed on the way out (also on Ctrl-C / SIGTERM,
which end the chaos early and still verify what was written; the group phase is then
skipped). Exit status: 0 all PASS,
1 a FAIL, 2 bad usage, 3 watchdog.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import multiprocessing
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from typing import Any, Dict, List, Optional, Tuple

from _provenance import mplog_source  # scripts/ is on sys.path when a script runs

import psutil

import mplog

NAME = "soak"
WORKER_LOGGER = "soak.worker"
MAIN_LOGGER = "soak.main"
REPORT_EVERY = 100
SMALL_BODY = 24
STATUS_EVERY = 5.0
SEP = b"-" * 72


# -- the records ---------------------------------------------------------------------------------
def record_body(wid: int, gen: int, seq: int, size: int) -> str:
    unit = f"{wid}:{gen}:{seq}/"
    return (unit * (size // len(unit) + 1))[:size]


def record_message(wid: int, gen: int, seq: int, size: int) -> str:
    head = f"w{wid}.{gen} seq {seq} len {size}"
    body = record_body(wid, gen, seq, size)
    chk = zlib.crc32(f"{head} {body}".encode())
    return f"{head} chk {chk:08x} {body}"


WORKER_MSG = re.compile(rb"^w(\d+)\.(\d+) seq (\d+) len (\d+) chk ([0-9a-f]{8}) (.*)$", re.S)
MAIN_MSG = re.compile(rb"^main event (\d+): ")


def check_worker_message(m: "re.Match[bytes]") -> bool:
    wid, gen, seq, size = (int(m.group(i)) for i in range(1, 5))
    body = m.group(6)
    if len(body) != size or body != record_body(wid, gen, seq, size).encode():
        return False
    head = f"w{wid}.{gen} seq {seq} len {size}".encode()
    return zlib.crc32(head + b" " + body) == int(m.group(5), 16)


# -- the worker process --------------------------------------------------------------------------
def write_report(path: str, count: int, done: bool) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{count} {int(done)} {os.getpid()}\n")
    os.replace(tmp, path)


def read_report(path: str) -> Tuple[int, bool]:
    try:
        with open(path) as f:
            count, done, _pid = f.read().split()
        return int(count), done == "1"
    except (OSError, ValueError):
        return 0, False


def worker_main(cfg: Any, wid: int, gen: int, rate: float, stop_path: str, report_path: str,
                big_every: int, big_size: int) -> None:
    # Ctrl-C goes to the whole process group: the main process decides how workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mplog.worker_init(cfg)
    log = logging.getLogger(WORKER_LOGGER)
    parent = os.getppid()  # the main process, or the forkserver: both go when the run goes
    interval = 1.0 / rate
    seq = 0
    write_report(report_path, 0, False)
    t0 = time.monotonic()
    next_check = 0.0
    while True:
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.1
            if os.path.exists(stop_path) or os.getppid() != parent:
                break
        due = t0 + seq * interval
        if due > now:
            time.sleep(min(due - now, 0.1))
            continue
        if now - due > 1.0:  # more than 1 s behind (an overloaded machine): no catch-up burst
            t0 = now - seq * interval
        size = big_size if big_every and seq % big_every == big_every - 1 else SMALL_BODY
        log.info(record_message(wid, gen, seq, size))
        seq += 1
        if seq % REPORT_EVERY == 0:
            write_report(report_path, seq, False)
    write_report(report_path, seq, True)


# -- the main process ----------------------------------------------------------------------------
class Worker:
    def __init__(self, wid: int, gen: int, proc: Any, report_path: str) -> None:
        self.wid = wid
        self.gen = gen
        self.proc = proc
        self.pid: Optional[int] = proc.pid
        self.report_path = report_path
        self.killed = False       # by us, SIGKILL
        self.unexpected: Optional[str] = None  # died on its own: how
        self.unstoppable = False  # did not stop when asked; killed at the end
        self.exitcode: Optional[int] = None
        self.count = 0            # reported
        self.done = False         # the report is final (clean exit)

    @property
    def key(self) -> Tuple[int, int]:
        return (self.wid, self.gen)


RING_FILE = re.compile(r"ring\.\d+\Z")


def ring_fds(pid: Optional[int], spool: Optional[str]) -> Optional[int]:
    """How many of ``pid``'s descriptors are rings of ``spool`` (None if we cannot tell)."""
    if not pid or not spool:
        return None
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    spool = os.path.realpath(spool)
    n = 0
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if os.path.dirname(target) == spool and RING_FILE.match(os.path.basename(target)):
            n += 1
    return n


def listener_snapshot(health: Dict[str, Any]) -> Dict[str, Any]:
    info = health.get("listener") or {}
    fds = info.get("num_fds")
    # The listener maps the ring of every live process, and a mapping holds a descriptor of its
    # own (CPython's mmap dups the fd): those follow the processes; "base_fds" are the rest.
    rings = ring_fds(info.get("pid"), (health.get("queue") or {}).get("spool"))
    return {"pid": info.get("pid"), "alive": info.get("alive"), "rss": info.get("rss_bytes"),
            "fds": fds, "rings": rings, "base_fds": None if fds is None or rings is None else fds - rings,
            "uptime": info.get("uptime_s")}


def mb(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1048576:.1f} MB"


class Soak:
    def __init__(self, args: argparse.Namespace, directory: str) -> None:
        self.args = args
        self.dir = directory
        self.rng = random.Random(args.seed)
        self.ctx = multiprocessing.get_context(args.start_method)
        self.reports = os.path.join(directory, f"{NAME}-reports")
        self.stop_path = os.path.join(self.reports, "STOP")
        self.svc: Any = None
        self.workers: Dict[int, Worker] = {}
        self.history: List[Worker] = []
        self.main_log = logging.getLogger(MAIN_LOGGER)
        self.main_events = 0
        self.listener_kills = 0
        self.listener_kill_skipped = 0
        self.worker_kills = 0
        self.rotations = 0
        self.rotated: List[Tuple[str, str]] = []  # (full, simplified) per rotation, in order
        self.start_listener: Dict[str, Any] = {}
        self.end_listener: Dict[str, Any] = {}
        self.max_rss = 0
        self.max_fds = 0
        self.main_fds_start: Optional[int] = None
        self.main_fds_end: Optional[int] = None
        self.flushed: Optional[bool] = None
        self.final: Optional[Dict[str, Any]] = None
        self.spool: Optional[str] = None  # the service's spool directory
        self.max_rings = 0
        self.end_rings: Optional[int] = None
        self.spool_after_stop: Optional[bool] = None
        self.group_pgid: Optional[int] = None  # the group-SIGTERM phase's child, while it runs
        self.elapsed = 0.0
        self.interrupted: Optional[str] = None
        self.t0 = time.monotonic()

    # -- helpers ----------------------------------------------------------------------------------
    def event(self, text: str) -> None:
        """One verifiable application record from the main process."""
        self.main_log.info("main event %d: %s", self.main_events, text)
        self.main_events += 1

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    # -- workers ----------------------------------------------------------------------------------
    def start_worker(self, wid: int, gen: int) -> Worker:
        report = os.path.join(self.reports, f"w{wid}.{gen}")
        a = self.args
        proc = self.ctx.Process(target=worker_main, name=f"soak-w{wid}.{gen}", daemon=True,
                                args=(self.svc.worker_config, wid, gen, a.rate, self.stop_path, report,
                                      a.big_every, a.big_size))
        proc.start()
        w = Worker(wid, gen, proc, report)
        self.workers[wid] = w
        self.history.append(w)
        return w

    def reap(self, w: Worker, timeout: float) -> None:
        w.proc.join(timeout)
        w.exitcode = w.proc.exitcode
        if w.exitcode is not None:
            w.count, w.done = read_report(w.report_path)
            w.proc.close()

    def kill_worker(self) -> None:
        alive = [w for w in self.workers.values() if w.proc.is_alive()]
        if not alive:
            return
        w = self.rng.choice(alive)
        try:
            os.kill(w.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        w.killed = True
        self.reap(w, 5.0)
        self.worker_kills += 1
        self.event(f"killed worker w{w.wid}.{w.gen} pid {w.pid} (exit {w.exitcode}) after {w.count}+ records")
        self.start_worker(w.wid, w.gen + 1)

    def check_workers(self) -> None:
        for w in list(self.workers.values()):
            if w.proc.exitcode is not None and not w.killed:
                self.reap(w, 1.0)
                w.unexpected = f"exit code {w.exitcode}"
                self.say(f"UNEXPECTED: worker w{w.wid}.{w.gen} pid {w.pid} died ({w.unexpected}); replacing it")
                self.event(f"worker w{w.wid}.{w.gen} died unexpectedly ({w.unexpected})")
                self.start_worker(w.wid, w.gen + 1)

    def stop_workers(self, timeout: float) -> None:
        with open(self.stop_path, "w"):
            pass
        deadline = time.monotonic() + timeout
        for w in self.workers.values():
            self.reap(w, max(0.0, deadline - time.monotonic()))
        for w in self.workers.values():
            if w.exitcode is None:
                w.unstoppable = True
                try:
                    os.kill(w.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.reap(w, 5.0)
            elif w.exitcode != 0 and not w.killed:
                w.unexpected = f"exit code {w.exitcode} at stop"

    def kill_everything(self) -> None:
        """Last resort on the way out: no child of ours survives the script."""
        if self.group_pgid is not None:
            try:
                os.killpg(self.group_pgid, signal.SIGKILL)
            except OSError:
                pass
        for w in self.history:
            try:
                if w.proc.exitcode is None:
                    os.kill(w.proc.pid, signal.SIGKILL)
                    w.proc.join(2.0)
            except (ValueError, OSError, AssertionError):
                pass

    # -- the listener and the files --------------------------------------------------------------
    def kill_listener(self) -> bool:
        snap = listener_snapshot(self.svc.health())
        if not snap["alive"] or not snap["pid"]:
            self.listener_kill_skipped += 1
            return False  # restarting: try again shortly
        try:
            os.kill(snap["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.listener_kills += 1
        self.event(f"killed listener pid {snap['pid']} (kill {self.listener_kills})")
        return True

    def rotate(self) -> None:
        self.rotations += 1
        k = self.rotations
        moved = []
        for path in (str(self.svc.full_path), str(self.svc.simplified_path)):
            target = f"{path}.{k}"
            try:
                os.rename(path, target)
            except FileNotFoundError:
                target = ""
            moved.append(target)
            # logrotate "create": a new empty file, then tell the program.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.close(fd)
        self.rotated.append((moved[0], moved[1]))
        self.svc.reopen()
        self.event(f"rotated the logs to .{k}")

    def sample(self, health: Dict[str, Any]) -> Dict[str, Any]:
        snap = listener_snapshot(health)
        if snap["rss"]:
            self.max_rss = max(self.max_rss, snap["rss"])
        if snap["fds"]:
            self.max_fds = max(self.max_fds, snap["fds"])
        return snap

    def live_listener_health(self, timeout: float = 15.0) -> Dict[str, Any]:
        """health(), once a listener is up (one may have just been killed): bounded."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.svc.health()
            if listener_snapshot(h)["fds"] or time.monotonic() >= deadline:
                return h
            time.sleep(0.1)

    def status(self, elapsed: float) -> None:
        h = self.svc.health()
        snap = self.sample(h)
        r = h["records"]
        rate = r["sent"] / elapsed if elapsed > 0 else 0.0
        q = h["queue"]
        self.max_rings = max(self.max_rings, q.get("rings") or 0)
        self.say(f"{elapsed:6.0f}/{self.args.duration:.0f}s {h['status']:<8} sent {r['sent']:>9} "
                 f"written {r['written']:>9} ({rate:,.0f}/s) lost {r['lost']} dropped {r['dropped']} "
                 f"diverted {r['diverted']} depth {q['depth']} spool {q.get('rings')} rings "
                 f"{mb(q.get('bytes'))} restarts {h['restarts']} | "
                 f"listener {snap['pid']} rss {mb(snap['rss'])} fds {snap['fds']} | kills L{self.listener_kills} "
                 f"W{self.worker_kills} rot {self.rotations}")

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        os.makedirs(self.reports, exist_ok=True)
        self.svc = mplog.LogService(self.dir, name=NAME, shutdown_timeout=a.shutdown_timeout)
        self.svc.start()
        h = self.svc.health()
        self.spool = h["queue"].get("spool")
        self.say(f"service started: listener pid {h['listener']['pid']}, logs in {self.dir}, spool {self.spool}")
        self.event("soak started")
        for wid in range(a.workers):
            self.start_worker(wid, 0)
        if not self.svc.flush(30.0):
            self.say("warning: the first flush did not complete within 30 s")
        # Measure once the workers log and the listener has settled into its steady state.
        time.sleep(1.0)
        self.start_listener = self.sample(self.live_listener_health())
        self.main_fds_start = psutil.Process().num_fds()
        self.say(f"start: listener pid {self.start_listener['pid']} rss {mb(self.start_listener['rss'])} "
                 f"fds {self.start_listener['fds']}; main process fds {self.main_fds_start}")

        def jitter(every: float) -> float:
            return every * self.rng.uniform(0.5, 1.5)

        start = time.monotonic()
        inf = float("inf")
        next_lkill = start + jitter(a.kill_listener_every) if a.kill_listener_every > 0 else inf
        next_wkill = start + jitter(a.kill_worker_every) if a.kill_worker_every > 0 else inf
        # A run shorter than the rotation period still rotates once, at half-time.
        next_rot = start + min(a.rotate_every, a.duration / 2) if a.rotate_every > 0 else inf
        next_status = start + STATUS_EVERY
        end = start + a.duration
        try:
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                self.check_workers()
                if now >= next_lkill:
                    next_lkill = (now + jitter(a.kill_listener_every)) if self.kill_listener() else now + 0.5
                if now >= next_wkill:
                    self.kill_worker()
                    next_wkill = now + jitter(a.kill_worker_every)
                if now >= next_rot:
                    self.rotate()
                    next_rot = max(next_rot + a.rotate_every, now)
                if now >= next_status:
                    self.status(now - start)
                    next_status += STATUS_EVERY
                wake = min(next_lkill, next_wkill, next_rot, next_status, end)
                time.sleep(min(0.25, max(0.0, wake - time.monotonic())))
        except KeyboardInterrupt:
            self.interrupted = "interrupted (Ctrl-C / SIGTERM): chaos ended early"
            self.say(self.interrupted + "; stopping and verifying what was written")
        self.elapsed = time.monotonic() - start
        self.check_workers()
        self.end_listener = self.sample(self.live_listener_health())
        self.main_fds_end = psutil.Process().num_fds()
        self.say(f"end: listener pid {self.end_listener['pid']} rss {mb(self.end_listener['rss'])} "
                 f"fds {self.end_listener['fds']} (up {self.end_listener['uptime']} s); main process fds "
                 f"{self.main_fds_end}")
        self.end_rings = self.rings_settled(a.workers + 1)
        self.event("soak stopping")
        self.stop_workers(15.0)
        self.flushed = self.svc.flush(30.0)
        self.final = self.svc.stop()
        self.spool_after_stop = bool(self.spool) and os.path.exists(self.spool)
        self.say(f"stopped: {self.final['records']}")

    def rings_settled(self, want: int, timeout: float = 5.0) -> int:
        """The rings in the spool, once the rings of killed workers are retired (the listener
        does that once a second): at most ``want`` (the workers and the main process)."""
        deadline = time.monotonic() + timeout
        while True:
            rings = self.svc.health()["queue"].get("rings") or 0
            if rings <= want or time.monotonic() >= deadline:
                self.max_rings = max(self.max_rings, rings)
                return rings
            time.sleep(0.2)


# -- verification --------------------------------------------------------------------------------
HEADER = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[(?:[A-Z]+|Level \d+)\] \[([^\]]*)\] "
                    rb"\[[^\]]*:(\d+)\] \[[^\]]*:\d+\]$")
SIMPLE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (.*)$", re.S)
# A listener killed before it wrote its restart notice leaves it to the next, marked late.
RESTART = re.compile(rb"^listener restarted after (\S+)(?: \(a late notice[^)]*\))?; (\d+) records lost$")
SUMMARY = re.compile(rb"^mplog stopped(?: \(([^)]*)\))?: (\d+) records written, (\d+) dropped, (\d+) lost")
APP_GONE = b"the application exited without stopping the log service"
# The record of a worker's abnormal end (issue 12): "<name> (pid N) was killed by SIGKILL after ..."
DEATH = re.compile(rb"^(?:(?:ERROR|WARNING|CRITICAL): )?\S+ \(pid (\d+)\) (?:was killed by|was stopped by|crashed with|"
                   rb"exited with|ended by) (\S+)")
# A worker killed while no listener ran (a killed listener being replaced): nobody could take its
# exit status (README, "Why did my worker die?").
UNSEEN = re.compile(rb"^(?:(?:ERROR|WARNING|CRITICAL): )?\S+ \(pid (\d+)\) ended before the listener could watch it")


class Tally:
    """How many times each (worker, gen, seq) was seen: one bytearray per (worker, gen)."""

    def __init__(self) -> None:
        self.counts: Dict[Tuple[int, int], bytearray] = {}
        self.records = 0
        self.dups = 0
        self.dup_examples: List[str] = []

    def add(self, key: Tuple[int, int], seq: int) -> None:
        arr = self.counts.get(key)
        if arr is None:
            arr = self.counts[key] = bytearray(max(1024, seq + 1))
        elif seq >= len(arr):
            arr.extend(bytes(max(seq + 1 - len(arr), len(arr))))
        if arr[seq]:
            self.dups += 1
            if len(self.dup_examples) < 5:
                self.dup_examples.append(f"w{key[0]}.{key[1]} seq {seq}")
        if arr[seq] < 255:
            arr[seq] += 1
        self.records += 1

    def present(self, key: Tuple[int, int]) -> Tuple[int, int]:
        """(distinct seqs present, highest seq present + 1)."""
        arr = self.counts.get(key)
        if arr is None:
            return 0, 0
        distinct = len(arr) - arr.count(0)
        top = len(arr.rstrip(b"\0"))
        return distinct, top

    def same_as(self, other: "Tally") -> bool:
        keys = set(self.counts) | set(other.counts)
        for k in keys:
            a = bytes(self.counts.get(k, b"")).rstrip(b"\0")
            b = bytes(other.counts.get(k, b"")).rstrip(b"\0")
            if a != b:
                return False
        return True


class Verification:
    def __init__(self, pids: Dict[Tuple[int, int], Optional[int]], worker_logger: str = WORKER_LOGGER) -> None:
        self.pids = pids
        self.worker_logger = worker_logger.encode()
        self.full = Tally()
        self.simple = Tally()
        self.files: List[Tuple[str, int]] = []
        self.blocks = 0
        self.app_records = 0         # blocks of any logger but mplog
        self.main_records = 0
        self.main_seen: Dict[int, int] = {}
        self.other_app = 0
        self.garbled = 0             # lines/blocks that do not parse
        self.bad_records = 0         # worker records that parse but are not intact
        self.examples: List[str] = []
        self.restart_notices = 0
        self.restart_lost = 0
        self.restart_reasons: Dict[str, int] = {}
        self.summaries: List[Tuple[int, int, int]] = []
        self.summary_hows: List[str] = []   # "" for "mplog stopped:", else the parenthesis
        self.app_gone_notices = 0
        self.death_pids: Dict[int, bytes] = {}  # pid -> how it ended, from the full log's records
        self.simple_deaths = 0
        self.other_notices: List[str] = []
        self.simple_lines = 0
        self.simple_garbled = 0
        self.simple_main = 0
        self.simple_restart_notices = 0

    def bad(self, what: str, path: str, lineno: int, line: bytes) -> None:
        if len(self.examples) < 8:
            self.examples.append(f"{what} at {os.path.basename(path)}:{lineno}: {line[:160]!r}")

    # -- full logs: blocks -------------------------------------------------------------------------
    def full_log(self, path: str) -> None:
        self.files.append((path, os.path.getsize(path)))
        header: Optional["re.Match[bytes]"] = None
        body: List[bytes] = []
        start_line = 0
        lineno = 0
        resync = False
        with open(path, "rb") as f:
            for raw in f:
                lineno += 1
                if not raw.endswith(b"\n"):
                    self.garbled += 1
                    self.bad("unterminated last line", path, lineno, raw)
                    header = None
                    break
                line = raw[:-1]
                if header is None:
                    m = HEADER.match(line)
                    if m is None:
                        if not resync:  # one garbled region counts once
                            self.garbled += 1
                            self.bad("not a block header", path, lineno, line)
                            resync = True
                        continue
                    resync = False
                    header, body, start_line = m, [], lineno
                elif line == SEP:
                    self.block(header, body, path, start_line)
                    header = None
                elif line.startswith(b"  "):
                    body.append(line)
                else:
                    self.garbled += 1
                    self.bad("unindented line inside a block", path, lineno, line)
                    header = None
                    resync = True
        if header is not None:
            self.garbled += 1
            self.bad("unterminated block", path, start_line, header.group(0))

    def block(self, header: "re.Match[bytes]", body: List[bytes], path: str, lineno: int) -> None:
        self.blocks += 1
        if not body or not body[0].startswith(b"  Message: "):
            self.garbled += 1
            self.bad("block without a message", path, lineno, header.group(0))
            return
        logger = header.group(1)
        msg = body[0][11:]
        if logger == b"mplog":
            text = b"\n".join([msg] + [b[11:] for b in body[1:] if b.startswith(b"           ")])
            m = RESTART.match(text)
            if m:
                self.restart_notices += 1
                self.restart_lost += int(m.group(2))
                reason = m.group(1).decode()
                self.restart_reasons[reason] = self.restart_reasons.get(reason, 0) + 1
                return
            m = SUMMARY.match(text)
            if m:
                self.summaries.append((int(m.group(2)), int(m.group(3)), int(m.group(4))))
                self.summary_hows.append((m.group(1) or b"").decode())
                return
            if text == APP_GONE:
                self.app_gone_notices += 1
                return
            m = DEATH.match(text) or UNSEEN.match(text)
            if m:
                self.death_pids[int(m.group(1))] = m.group(2) if m.re is DEATH else b"unseen"
                return
            self.other_notices.append(f"{os.path.basename(path)}:{lineno}: {text[:200]!r}")
            return
        self.app_records += 1
        if logger == self.worker_logger:
            m = WORKER_MSG.match(msg)
            if m is None or len(body) != 1:
                self.bad_records += 1
                self.bad("malformed worker record", path, lineno, msg)
                return
            key = (int(m.group(1)), int(m.group(2)))
            if not check_worker_message(m) or self.pids.get(key) != int(header.group(2)):
                self.bad_records += 1
                self.bad("corrupt or misattributed worker record", path, lineno, header.group(0) + b" " + msg)
                return
            self.full.add(key, int(m.group(3)))
        elif logger == MAIN_LOGGER.encode():
            m = MAIN_MSG.match(msg)
            if m is None:
                self.bad_records += 1
                self.bad("malformed main record", path, lineno, msg)
                return
            self.main_records += 1
            n = int(m.group(1))
            self.main_seen[n] = self.main_seen.get(n, 0) + 1
        else:
            self.other_app += 1
            self.bad(f"record of an unexpected logger {logger!r}", path, lineno, msg)

    # -- simplified logs: lines --------------------------------------------------------------------
    def simplified_log(self, path: str) -> None:
        self.files.append((path, os.path.getsize(path)))
        lineno = 0
        with open(path, "rb") as f:
            for raw in f:
                lineno += 1
                if not raw.endswith(b"\n"):
                    self.simple_garbled += 1
                    self.bad("unterminated last line", path, lineno, raw)
                    break
                line = raw[:-1]
                if line.startswith(b"    "):  # a continuation (the stop summary's warnings)
                    continue
                m = SIMPLE_LINE.match(line)
                if m is None:
                    self.simple_garbled += 1
                    self.bad("not a simplified line", path, lineno, line)
                    continue
                self.simple_lines += 1
                text = m.group(1)
                if text.startswith(b"w"):
                    wm = WORKER_MSG.match(text)
                    if wm is None or not check_worker_message(wm):
                        self.simple_garbled += 1
                        self.bad("corrupt worker line", path, lineno, line)
                        continue
                    self.simple.add((int(wm.group(1)), int(wm.group(2))), int(wm.group(3)))
                elif MAIN_MSG.match(text):
                    self.simple_main += 1
                elif text.startswith(b"WARNING: listener restarted after "):
                    self.simple_restart_notices += 1
                elif text.startswith((b"mplog stopped: ", b"mplog stopped (")) or text == b"WARNING: " + APP_GONE:
                    pass
                elif DEATH.match(text) or UNSEEN.match(text):
                    self.simple_deaths += 1
                else:
                    self.simple_garbled += 1
                    self.bad("unexpected simplified line", path, lineno, line)


def verify(soak: Soak) -> bool:
    final = soak.final
    assert final is not None
    rec = final["records"]
    svc = soak.svc
    v = Verification({w.key: w.pid for w in soak.history})
    t_parse = time.monotonic()
    full_paths = [f for f, _s in soak.rotated if f] + [str(svc.full_path)]
    simple_paths = [s for _f, s in soak.rotated if s] + [str(svc.simplified_path)]
    for p in full_paths:
        if os.path.exists(p):
            v.full_log(p)
    for p in simple_paths:
        if os.path.exists(p):
            v.simplified_log(p)
    t_parse = time.monotonic() - t_parse

    # What the workers say they logged, against what the files hold.
    clean_logged = killed_low = killed_high = 0
    gaps = beyond = 0
    beyond_examples: List[str] = []
    for w in soak.history:
        distinct, top = v.full.present(w.key)
        clean = w.done and not w.killed and not w.unstoppable
        if clean:
            low = high = w.count
        else:  # killed: it logged at least its last report, at most REPORT_EVERY more
            low, high = max(w.count, top), w.count + REPORT_EVERY
        if clean:
            clean_logged += w.count
        else:
            killed_low += low
            killed_high += high
        if top > high:
            beyond += 1
            if len(beyond_examples) < 5:
                beyond_examples.append(f"w{w.wid}.{w.gen}: seq {top - 1} in the files, reported {w.count}")
        # Missing: below what a clean worker reported; for a killed one, below its highest record
        # in the files or its last report (those calls had returned: their records were in the
        # spool, which a kill of the worker or of the listener does not lose).
        gaps += max(0, w.count - distinct) if clean else max(0, max(min(top, high), w.count) - distinct)
    main_missing = soak.main_events - len(v.main_seen)
    main_dups = sum(n - 1 for n in v.main_seen.values() if n > 1)
    worker_sent = rec["sent"] - soak.main_events  # the main process logs nothing else
    killed_sent = worker_sent - clean_logged
    in_files = v.full.records + v.main_records + v.other_app
    a_workers = soak.args.workers

    checks: List[Tuple[bool, str]] = []

    def check(ok: bool, text: str) -> None:
        checks.append((bool(ok), text))

    check(soak.interrupted is None, "the chaos ran for the requested duration"
          + (f" ({soak.interrupted}, after {soak.elapsed:.1f} s)" if soak.interrupted else ""))
    unexpected = [w for w in soak.history if w.unexpected]
    unstoppable = [w for w in soak.history if w.unstoppable]
    check(not unexpected and not unstoppable,
          f"every worker death was one of our kills (unexpected exits {len(unexpected)}"
          + (": " + ", ".join(f"w{w.wid}.{w.gen} {w.unexpected}" for w in unexpected[:5]) if unexpected else "")
          + f"; did not stop when asked {len(unstoppable)})")
    check(soak.flushed is True, f"svc.flush() before stop returned True (got {soak.flushed})")
    check(v.garbled == 0, f"every block of the full logs parses (garbled {v.garbled})")
    check(v.simple_garbled == 0, f"every line of the simplified logs parses (garbled {v.simple_garbled})")
    check(v.bad_records == 0 and v.other_app == 0,
          f"every application record is intact and ours: body, CRC, pid (bad {v.bad_records}, "
          f"foreign {v.other_app})")
    check(v.full.dups == 0 and main_dups == 0,
          f"no record twice in the full logs (duplicates {v.full.dups + main_dups}"
          + (": " + ", ".join(v.full.dup_examples) if v.full.dup_examples else "") + ")")
    check(v.simple.dups == 0, f"no record twice in the simplified logs (duplicates {v.simple.dups})")
    check(in_files == rec["written"],
          f"application records in the files == written ({in_files} vs {rec['written']}, "
          f"difference {in_files - rec['written']:+d})")
    check(v.simple.same_as(v.full) and v.simple_main == v.main_records,
          f"the simplified logs hold the same records as the full logs ({v.simple.records + v.simple_main} vs "
          f"{v.full.records + v.main_records})")
    total = rec["written"] + rec["dropped"] + rec["diverted"] + rec["lost"]
    check(rec["sent"] == total,
          f"sent == written + dropped + diverted + lost ({rec['sent']} vs {total})")
    counted = rec["torn"] + rec["lost_with_listener"] + rec["unattributed_lost"]
    check(rec["lost"] == counted,
          f"lost == torn + lost_with_listener + unattributed_lost ({rec['lost']} vs {rec['torn']} + "
          f"{rec['lost_with_listener']} + {rec['unattributed_lost']})")
    check(rec["unattributed_lost"] == 0,
          f"unattributed_lost == 0: lost equals the counted losses (unattributed {rec['unattributed_lost']})")
    check(v.restart_lost == 0 and rec["lost_with_listener"] == 0 and rec["lost"] == 0,
          f"a listener kill loses nothing: every restart notice says 0 records lost, lost_with_listener == 0, "
          f"lost == 0 (over {soak.listener_kills} kills: notices say {v.restart_lost}, lost_with_listener "
          f"{rec['lost_with_listener']}, lost {rec['lost']}, torn {rec['torn']})")
    check(v.restart_notices == final["restarts"] == soak.listener_kills,
          f"one restart per listener kill and one notice per restart (kills {soak.listener_kills}, "
          f"restarts {final['restarts']}, notices {v.restart_notices})")
    killed_pids = {w.pid for w in soak.history if w.killed or w.unstoppable}
    unseen = sum(1 for how in v.death_pids.values() if how == b"unseen")
    check(set(v.death_pids) == killed_pids and set(v.death_pids.values()) <= {b"SIGKILL", b"unseen"}
          and unseen <= soak.listener_kills and v.simple_deaths == len(killed_pids),
          f"one record of its end per worker we killed, SIGKILL, in both logs, and none for any other process "
          f"(killed {len(killed_pids)}, records {len(v.death_pids)} {sorted(set(v.death_pids.values()))}, "
          f"simplified lines {v.simple_deaths}; killed while a killed listener was being replaced, so "
          f"'exit status unknown': {unseen})")
    summary_ok = len(v.summaries) == 1 and v.summaries[0][0] == rec["written"] and v.summary_hows == [""]
    check(summary_ok and not v.other_notices and not v.app_gone_notices,
          f"one stop summary, its count == written, no other notice ({v.summaries}; other notices "
          f"{len(v.other_notices) + v.app_gone_notices})")
    check(killed_low <= killed_sent <= killed_high and clean_logged <= worker_sent,
          f"sent agrees with the workers' reports (clean workers {clean_logged}; killed workers: sent "
          f"{killed_sent}, reports allow {killed_low}..{killed_high})")
    check(beyond == 0, f"no record beyond what its worker logged ({beyond}"
          + (": " + ", ".join(beyond_examples) if beyond_examples else "") + ")")
    missing = gaps + max(0, main_missing)
    allowed = rec["lost"] + rec["dropped"] + rec["diverted"]
    check(missing <= allowed, f"records missing from the files <= lost + dropped + diverted ({missing} <= {allowed})")
    reopens = final.get("reopens")
    check(not soak.rotations or (reopens is not None and reopens >= 2 * soak.rotations),
          f"the listener reopened both files at each rotation: reopens >= 2 x rotations ({reopens} vs "
          f"{soak.rotations} rotations; {soak.listener_kills} listener restarts)")
    check(soak.end_rings is not None and soak.end_rings <= a_workers + 1,
          f"the rings of killed workers are retired: rings in the spool at the end <= workers + 1 "
          f"({soak.end_rings} <= {a_workers + 1}; most seen {soak.max_rings}; {len(soak.history)} worker generations)")
    check(soak.spool_after_stop is False,
          f"the spool directory is gone after stop() ({soak.spool}: "
          f"{'still there' if soak.spool_after_stop else 'gone' if soak.spool_after_stop is False else 'unknown'}"
          f"{', spool_kept ' + str(final.get('spool_kept')) if final.get('spool_kept') else ''})")
    lf0, lf1 = soak.start_listener.get("base_fds"), soak.end_listener.get("base_fds")
    check(lf0 is not None and lf1 is not None and lf1 <= lf0 + 2,
          f"listener fds did not grow, its rings' aside (start {lf0} + {soak.start_listener.get('rings')} rings, "
          f"end {lf1} + {soak.end_listener.get('rings')} rings)")
    mf0, mf1 = soak.main_fds_start, soak.main_fds_end
    check(mf0 is not None and mf1 is not None and mf1 <= mf0 + 3,
          f"main process fds did not grow (start {mf0}, end {mf1})")

    # -- the report --------------------------------------------------------------------------------
    a = soak.args
    sizes = sum(s for _p, s in v.files)
    print()
    print("=" * 100)
    print(f"mplog soak report: {soak.elapsed:.1f} s of chaos (requested {a.duration:g}), {a.workers} workers x "
          f"{a.rate:g} records/s, start method {a.start_method}, seed {a.seed}")
    if soak.interrupted:
        print(f"NOTE: {soak.interrupted}")
    print(f"logs: {soak.dir}")
    print(f"chaos: listener kills {soak.listener_kills} (postponed {soak.listener_kill_skipped} while it was "
          f"restarting), worker kills {soak.worker_kills} ({len(soak.history)} worker generations), "
          f"rotations {soak.rotations} (listener reopens {final.get('reopens', '?')}), unexpected worker exits "
          f"{len(unexpected)}")
    print(f"records (final health):  sent {rec['sent']}   written {rec['written']}   dropped {rec['dropped']}   "
          f"diverted {rec['diverted']}   lost {rec['lost']}")
    print(f"  lost = torn {rec['torn']} + lost_with_listener {rec['lost_with_listener']} + "
          f"unattributed_lost {rec['unattributed_lost']}")
    print(f"  replaced {rec.get('replaced')}   malformed_frames {rec.get('malformed_frames')}   "
          f"achieved rate {rec['sent'] / max(soak.elapsed, 1e-9):,.0f} records/s")
    print(f"restarts {final['restarts']} (last exit {(final.get('last_exit') or {}).get('name')}); restart "
          f"notices {v.restart_notices} {v.restart_reasons}, records lost in them {v.restart_lost}")
    s0, s1 = soak.start_listener, soak.end_listener
    print(f"listener at start: pid {s0.get('pid')} rss {mb(s0.get('rss'))} fds {s0.get('fds')}   "
          f"at end: pid {s1.get('pid')} rss {mb(s1.get('rss'))} fds {s1.get('fds')} (up {s1.get('uptime')} s)   "
          f"max seen: rss {mb(soak.max_rss)} fds {soak.max_fds}")
    print(f"main process fds: start {mf0} end {mf1}")
    print(f"spool: {soak.spool}; rings at the end {soak.end_rings} (most seen {soak.max_rings}); after stop() "
          f"{'still there' if soak.spool_after_stop else 'gone'}; reopens {final.get('reopens')}")
    print(f"files: {len(v.files)} ({len(full_paths)} full, {len(simple_paths)} simplified), {mb(sizes)}, "
          f"parsed in {t_parse:.1f} s; full-log blocks {v.blocks}: application {in_files} (worker "
          f"{v.full.records}, main {v.main_records}, other {v.other_app}), mplog notices "
          f"{v.blocks - in_files}; simplified lines {v.simple_lines}")
    print(f"workers: clean exits logged {clean_logged}; records missing from the files {missing} "
          f"(main events missing {max(0, main_missing)})")
    for e in v.examples:
        print(f"  example: {e}")
    for n in v.other_notices[:5]:
        print(f"  other notice: {n}")
    print("checks:")
    for ok, text in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    passed = all(ok for ok, _t in checks)
    print(f"RESULT: {'PASS' if passed else 'FAIL'} ({sum(ok for ok, _t in checks)}/{len(checks)} checks passed)")
    print("=" * 100, flush=True)
    return passed


# -- the group-SIGTERM phase ---------------------------------------------------------------------
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
        size = big_size if big_every and seq % big_every == big_every - 1 else SMALL_BODY
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
                           args=(svc.worker_config, wid, spec["round"], os.path.join(spec["dir"], f"progress.{wid}"),
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
    group_log_loop(logging.getLogger(GROUP_LOGGER), n, spec["round"], os.path.join(spec["dir"], f"progress.{n}"),
                   spec["big_every"], spec["big_size"], spec["hard_deadline"])
    return 4  # only when the soak never signalled us: its verification then fails


def _proc_stat(pid: int) -> Optional[Tuple[str, int]]:
    """(state, pgid) of ``pid`` from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def group_members(pgid: int) -> List[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                out.append(int(name))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")[:100].strip()
    except OSError:
        return "?"


class GroupRound:
    """One round of the group-SIGTERM phase, run from the soak's main process."""

    def __init__(self, soak: Soak, rnd: int) -> None:
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

    def progress_path(self, k: int) -> str:
        return os.path.join(self.dir, f"progress.{k}")

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
            popen = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_group-child", json.dumps(spec)],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        pgid = self.soak.group_pgid = popen.pid
        try:
            self._run(popen, pgid, info_path, rng)
        finally:
            if group_members(pgid):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass
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
            if self.info and all(Progress.read(self.progress_path(k))[0] >= GROUP_MIN_RECORDS
                                 for k in range(self.producers)):
                self.started_ok = True
                break
            time.sleep(0.05)
        if not self.started_ok:
            self.error = (f"the application did not get every process logging within 60 s (exit "
                          f"{popen.poll()}, progress {[Progress.read(self.progress_path(k))[0] for k in range(self.producers)]})")
            say(f"group round {self.rnd}: {self.error}")
            return
        time.sleep(rng.uniform(0.5, 2.0))  # logging goes on, the rings fill up
        self.t_signal = time.monotonic()
        self.before = [Progress.read(self.progress_path(k)) for k in range(self.producers)]
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
            st = _proc_stat(listener)
            if st is not None and st[0] not in ("Z", "X"):
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
                self.survivors = [f"{pid} {_cmdline(pid)}" for pid in sorted(members)]
                say(f"group round {self.rnd}: still running {a.shutdown_timeout + 20:.0f} s after the SIGTERM: "
                    f"{self.survivors}; killing the group")
                os.killpg(pgid, signal.SIGKILL)
                try:
                    os.kill(listener, signal.SIGKILL)
                except OSError:
                    pass
                break
            time.sleep(0.01)
        self.after = [Progress.read(self.progress_path(k)) for k in range(self.producers)]
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
    a = g.soak.args
    checks: List[Tuple[bool, str]] = []

    def check(ok: bool, text: str) -> None:
        checks.append((bool(ok), text))

    print()
    print("=" * 100)
    print(f"mplog group-SIGTERM round {g.rnd}: an application in its own session, {a.group_workers} workers "
          f"({a.start_method}) and its main process logging flat out; os.killpg(pgid, SIGTERM); logs in {g.dir}")
    check(g.started_ok, "every process of the application was logging when the group was signalled"
          + (f" ({g.error})" if g.error else ""))
    if not g.started_ok:
        return _print_checks(checks, g)
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
        distinct, top = v.full.present((k, g.rnd))
        arr = v.full.counts.get((k, g.rnd), bytearray())
        below = sum(1 for i in range(min(count, len(arr))) if arr[i]) if arr else 0
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
    return _print_checks(checks, g)


def _print_checks(checks: List[Tuple[bool, str]], g: GroupRound) -> bool:
    lines = [line for line in g.child_output.splitlines() if line.strip()]
    if lines:
        print(f"application output ({len(lines)} lines){':' if len(lines) <= 12 else ', the last 12:'}")
        for line in lines[-12:]:
            print(f"  | {line[:200]}")
    print("checks:")
    for ok, text in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    passed = all(ok for ok, _t in checks)
    print(f"RESULT (group round {g.rnd}): {'PASS' if passed else 'FAIL'} "
          f"({sum(ok for ok, _t in checks)}/{len(checks)} checks passed)")
    print("=" * 100, flush=True)
    return passed


# -- entry point ---------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of chaos (default 600)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rate", type=float, default=500.0, help="records/s per worker (default 500)")
    p.add_argument("--kill-listener-every", type=float, default=20.0, metavar="S",
                   help="SIGKILL the listener every S s, x0.5..x1.5 jitter (0: never; default 20)")
    p.add_argument("--kill-worker-every", type=float, default=15.0, metavar="S",
                   help="SIGKILL a random worker every S s, jittered, and replace it (0: never; default 15)")
    p.add_argument("--rotate-every", type=float, default=60.0, metavar="S",
                   help="rotate the logs every S s; a shorter run rotates once, at half-time (0: never; default 60)")
    p.add_argument("--big-every", type=int, default=250, metavar="N",
                   help="every N-th record of a worker is big (several frames; 0: never; default 250)")
    p.add_argument("--big-size", type=int, default=9000, metavar="CHARS")
    p.add_argument("--start-method", default="forkserver", choices=multiprocessing.get_all_start_methods())
    p.add_argument("--shutdown-timeout", type=float, default=10.0, help="LogService shutdown_timeout")
    p.add_argument("--dir", help="log directory (default: a new temporary one, removed after a PASS)")
    p.add_argument("--keep", action="store_true", help="keep the temporary log directory")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--group-sigterm", type=int, default=1, metavar="ROUNDS",
                   help="rounds of the group-SIGTERM phase after the soak: an application in its own session "
                        "gets os.killpg(pgid, SIGTERM) while it and its workers log (0: skip; default 1)")
    p.add_argument("--group-workers", type=int, default=4, metavar="N",
                   help="worker processes of the group-SIGTERM application (default 4)")
    p.add_argument("--_group-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._group_child:
        return group_child(args._group_child)
    if args.group_sigterm < 0 or args.group_workers < 1:
        p.error("--group-sigterm must be >= 0 and --group-workers >= 1")
    if args.workers < 1 or args.rate <= 0 or args.duration <= 0:
        p.error("--workers, --rate and --duration must be positive")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)

    if args.dir:
        directory = os.path.abspath(args.dir)
        os.makedirs(directory, exist_ok=True)
        leftovers = [n for n in os.listdir(directory)
                     if n.startswith(NAME + ".") or n == f"{NAME}-reports" or n.startswith("group-")]
        if leftovers:
            print(f"soak: {directory} already holds {sorted(leftovers)[:4]}...: the files are appended to, "
                  "which would mix runs; use an empty directory", file=sys.stderr)
            return 2
        temporary = False
    else:
        directory = tempfile.mkdtemp(prefix="mplog-soak-")
        temporary = True
    if args.start_method == "fork":
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # 3.12+: fork with threads

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"mplog soak: {args.duration:g} s, {args.workers} workers x {args.rate:g} records/s, start method "
          f"{args.start_method}, listener kill ~{args.kill_listener_every:g} s, worker kill "
          f"~{args.kill_worker_every:g} s, rotation {args.rotate_every:g} s, seed {args.seed}, then "
          f"{args.group_sigterm} group-SIGTERM round(s) with {args.group_workers} workers, logs in {directory}",
          flush=True)
    print(f"testing mplog {mplog_source()}", flush=True)

    soak = Soak(args, directory)

    # Watchdog: the run and the stop are bounded; if they overrun anyway, kill everything and exit 3.
    def watchdog() -> None:
        print(f"soak: WATCHDOG: the run did not finish within {budget:.0f} s; killing every child", file=sys.stderr,
              flush=True)
        soak.kill_everything()
        try:
            pid = listener_snapshot(soak.svc.health())["pid"] if soak.svc is not None else None
            if pid:
                os.kill(pid, signal.SIGKILL)
        except Exception:
            pass
        os._exit(3)

    budget = args.duration + 180.0 + args.group_sigterm * (100.0 + args.shutdown_timeout)
    timer = threading.Timer(budget, watchdog)
    timer.daemon = True
    timer.start()
    passed = False
    try:
        soak.run()
        rounds: List[GroupRound] = []
        if soak.interrupted is None:
            try:
                for k in range(args.group_sigterm):
                    soak.say(f"group-SIGTERM round {k}")
                    rounds.append(GroupRound(soak, k).run())
            except KeyboardInterrupt:
                soak.interrupted = "interrupted (Ctrl-C / SIGTERM) during the group-SIGTERM phase"
                soak.say(soak.interrupted + "; verifying what was written")
        timer.cancel()
        passed = verify(soak)
        for g in rounds:
            passed = verify_group(g) and passed
        if rounds:
            print(f"OVERALL: {'PASS' if passed else 'FAIL'} (soak and {len(rounds)} group-SIGTERM round(s))", flush=True)
    except KeyboardInterrupt:
        print("soak: interrupted again: aborting without verification", file=sys.stderr)
        return 1
    finally:
        timer.cancel()
        soak.kill_everything()
        if soak.svc is not None:
            try:
                soak.svc.stop()
            except Exception as exc:
                print(f"soak: stopping the service failed: {exc!r}", file=sys.stderr)
        if temporary and passed and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        elif temporary:
            print(f"soak: logs kept in {directory}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
