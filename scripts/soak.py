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
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

# scripts/ is on sys.path when a script runs
from _toolkit import kill, mb, mplog_source, ring_fds
from soak_checks import MAIN_LOGGER, REPORT_EVERY, WORKER_LOGGER, record_message, record_size, verify
from soak_group import GroupRound, group_child, verify_group

import psutil

import mplog

NAME = "soak"
STATUS_EVERY = 5.0


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
        size = record_size(seq, big_every, big_size)
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


def listener_snapshot(health: Dict[str, Any]) -> Dict[str, Any]:
    info = health.get("listener") or {}
    fds = info.get("num_fds")
    # The listener maps the ring of every live process, and a mapping holds a descriptor of its
    # own (CPython's mmap dups the fd): those follow the processes; "base_fds" are the rest.
    rings = ring_fds(info.get("pid"), (health.get("queue") or {}).get("spool"))
    return {"pid": info.get("pid"), "alive": info.get("alive"), "rss": info.get("rss_bytes"),
            "fds": fds, "rings": rings, "base_fds": None if fds is None or rings is None else fds - rings,
            "uptime": info.get("uptime_s")}


class Soak:
    """The chaos run: the service, the workers, the kills and rotations, and what was seen."""

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
        kill(w.proc.pid)
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
                kill(w.proc.pid)
                self.reap(w, 5.0)
            elif w.exitcode != 0 and not w.killed:
                w.unexpected = f"exit code {w.exitcode} at stop"

    def kill_everything(self) -> None:
        """Last resort on the way out: no child of ours survives the script."""
        kill(self.group_pgid, group=True)
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
