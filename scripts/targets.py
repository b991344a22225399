"""Measure mplog's non-throughput targets (performance issue), in one run, on this machine.

    python scripts/targets.py [--quick] [--listener-records 10000000] [--only NAME ...] [--runs 3]

Prints one line per target with the measured figure and the target, and whether it is met:
worker RSS growth over 1,000,000 dropped calls; listener RSS over 1,000,000 records (or
--listener-records; its own memory: the ring pages it maps are the spool's, shown beside it); start() until a first record
is in the file (spawn); worker_init; draining a 100,000-record backlog held in the spool, and
stop() with it; overload with overflow="drop" (caller p99, every drop counted) and "block" (no
loss); the cost of one health() call; listener CPU per record; restart after a SIGKILL; and
(big-record-neighbour, as root: it mounts a private tmpfs for the spool) how long a small
record waits for the file beside a process sending 4 MB records, after its SIGKILL and while it
lives (see big_record_neighbour for how it is measured). ``--only NAME`` runs the named targets.

Timings are wall-clock on a shared 2-core machine: run it when the machine is quiet and read
the figures, not the verdicts alone.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from typing import Any, Callable, Dict, List, Tuple

import psutil

import _toolkit
import targets_neighbour
import mplog

ROWS = []


def report(name: str, value: float, unit: str, target: str, ok: bool) -> None:
    ROWS.append((name, value, unit, target, ok))
    print(f"{name:<52} {value:>12.3f} {unit:<8} target {target:<14} {'met' if ok else 'NOT MET'}", flush=True)


def _count_records(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"[") and b"] [mplog] [" not in line:
                n += 1
    return n


def worker_rss_drop(tmp: Path, calls: int) -> None:
    with mplog.LogService(tmp / "rss", overflow="drop", queue_size=100) as svc:
        os.kill(svc.health()["listener"]["pid"], signal.SIGSTOP)
        try:
            log = logging.getLogger("rss")
            for i in range(10_000):
                log.info("warm %d", i)
            rss0 = psutil.Process().memory_info().rss
            for i in range(calls):
                log.info("processed item %d of %d: loss=%.6f", i, calls, i / 7)
            rss1 = psutil.Process().memory_info().rss
        finally:
            os.kill(svc.health()["listener"]["pid"], signal.SIGCONT)
        dropped = svc.health()["records"]["dropped"]
    report(f"worker RSS growth, {calls:,} calls, listener stopped (MB)", (rss1 - rss0) / 2**20, "MB",
           "<= 5", rss1 - rss0 <= 5 * 2**20)
    report("  of which dropped and counted", dropped, "records", f">= {calls * 0.99:,.0f}", dropped >= calls * 0.99)


def _private_rss(pid: int) -> int:
    """The listener's own memory: the rings in the spool are shared memory (tmpfs) that it maps,
    so they appear in its RSS as RssShmem, which this leaves out."""
    st = _toolkit.proc_status(pid)
    return st.get("RssAnon", 0) + st.get("RssFile", 0)


def _producer(cfg, n):
    mplog.worker_init(cfg)
    log = logging.getLogger("prod")
    for i in range(n):
        log.info("processed item %d of %d: loss=%.6f", i, n, i / 7)


def listener_rss_and_cpu(tmp: Path, records: int) -> None:
    # The listener maps every process's ring: the ring pages it touches count in its RSS as
    # shared memory (RssShmem), and they are the spool's memory (health()["queue"]["bytes"]),
    # released as batches are committed. The target is about the listener's own memory, so it
    # is measured on RSS minus RssShmem; the total and the shared part are printed beside it.
    ctx = multiprocessing.get_context("fork")
    with mplog.LogService(tmp / "lrss", level="INFO") as svc:
        pid = svc.health()["listener"]["pid"]
        listener = psutil.Process(pid)
        warm = ctx.Process(target=_producer, args=(svc.worker_config, 20_000))
        warm.start()
        warm.join()
        svc.flush(60)
        rss0 = listener.memory_info().rss
        own0 = _private_rss(pid)
        cpu0 = sum(listener.cpu_times()[:2])
        procs = [ctx.Process(target=_producer, args=(svc.worker_config, records // 2)) for _ in range(2)]
        for p in procs:
            p.start()
        peak, own_peak, shm_peak, spool_peak = rss0, own0, 0, 0
        while any(p.is_alive() for p in procs):
            peak = max(peak, listener.memory_info().rss)
            st = _toolkit.proc_status(pid)
            own_peak = max(own_peak, st.get("RssAnon", 0) + st.get("RssFile", 0))
            shm_peak = max(shm_peak, st.get("RssShmem", 0))
            spool_peak = max(spool_peak, svc.health()["queue"]["bytes"])
            time.sleep(0.05)  # sampling interval of the RSS probe
        svc.flush(120)
        cpu1 = sum(listener.cpu_times()[:2])
        rss1 = listener.memory_info().rss
        own1 = _private_rss(pid)
        queue = svc.health()["queue"]
        written = svc.health()["records"]["written"]
    own = max(own_peak, own1) - own0
    print(f"    listener RSS {rss0 / 2**20:.1f} -> peak {max(peak, rss1) / 2**20:.1f} MB, of which ring pages "
          f"(RssShmem) up to {shm_peak / 2**20:.1f} MB; spool in use up to {spool_peak / 2**20:.1f} MB "
          f"({queue['capacity_bytes'] / 2**20:.1f} MB per process ring; {queue['bytes'] / 2**20:.1f} MB after flush)")
    report(f"listener RSS change over {records:,} records, ring pages excluded (MB)", own / 2**20, "MB", "<= 5",
           abs(own) <= 5 * 2**20)
    per_record = (cpu1 - cpu0) / (written - 20_000) * 1e6
    report("listener CPU per record, both files, default formats (us)", per_record, "us", "<= 3", per_record <= 3)


def start_latency(tmp: Path, runs: int) -> None:
    times = []
    for k in range(runs):
        t0 = time.perf_counter()
        svc = mplog.LogService(tmp / f"start{k}")
        svc.start()
        logging.getLogger("s").info("first")
        svc.flush(10)
        times.append(time.perf_counter() - t0)
        svc.stop()
    med = statistics.median(times)
    report("start() until a first record is in the file (s, median)", med, "s", "<= 0.2", med <= 0.2)


def _time_init(cfg, q):
    t0 = time.perf_counter()
    mplog.worker_init(cfg)
    q.put(time.perf_counter() - t0)


def worker_init_cost(tmp: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with mplog.LogService(tmp / "init") as svc:
        q = ctx.Queue()
        costs = []
        for _ in range(5):
            p = ctx.Process(target=_time_init, args=(svc.worker_config, q))
            p.start()
            costs.append(q.get(timeout=60))
            p.join()
    med = statistics.median(costs) * 1000
    report("worker_init under spawn (ms, median of 5)", med, "ms", "<= 5", med <= 5)


def _fill(ctx: Any, svc: "mplog.LogService", n: int) -> None:
    """Two producer processes log ``n`` records between them, and are joined."""
    procs = [ctx.Process(target=_producer, args=(svc.worker_config, n // 2)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)


def drain(tmp: Path, backlog: int) -> None:
    # The backlog lives in the spool: each process's ring holds queue_size records whatever the
    # listener does. So with queue_size = backlog, two producers log the whole backlog while the
    # listener is stopped; time the drain itself, then fill the spool again and time stop().
    ctx = multiprocessing.get_context("fork")
    svc = mplog.LogService(tmp / "drain", queue_size=backlog, level="INFO", overflow="drop", shutdown_timeout=30)
    svc.start()
    listener = svc.health()["listener"]["pid"]
    os.kill(listener, signal.SIGSTOP)
    _fill(ctx, svc, backlog)
    queue = svc.health()["queue"]
    depth, capacity, used = queue["depth"], queue["capacity_bytes"], queue["bytes"]
    t0 = time.perf_counter()
    os.kill(listener, signal.SIGCONT)
    counters = svc._run.health.counters  # a cheap read of the shared counter, not a whole health() report
    while counters.get("written") < depth and time.perf_counter() - t0 < 30:
        pass  # spin: the drain itself is what is timed
    took = time.perf_counter() - t0
    rate = depth / took
    # Now the same with stop(): fill the spool again and time stop() itself.
    os.kill(listener, signal.SIGSTOP)
    _fill(ctx, svc, backlog)
    depth2 = svc.health()["queue"]["depth"]
    os.kill(listener, signal.SIGCONT)
    t1 = time.perf_counter()
    final = svc.stop()
    elapsed = time.perf_counter() - t1
    r = final["records"]
    print(f"    the spool held {depth:,} records ({used / 2**20:.1f} MB in use; rings of {capacity / 2**20:.1f} MB "
          f"per process), then {depth2:,}; drain rate {rate:,.0f} records/s; written {r['written']:,}, "
          f"dropped {r['dropped']:,}, lost {r['lost']:,}")
    complete = depth == depth2 == backlog and r["written"] == 2 * backlog and not r["dropped"] and not r["lost"]
    if not complete:
        print(f"    NOTE: expected a backlog of {backlog:,} records twice and {2 * backlog:,} written, none dropped")
    report(f"stop() with {depth2:,} records in the spool until the listener exited (s)", elapsed, "s", "<= 1.0",
           elapsed <= 1.0 and complete)
    print(f"    the drain itself: {depth:,} records in {took:.3f} s")
    report("  drain time of 100,000 records at that rate (s)", 100_000 / rate, "s", "<= 1.0",
           100_000 / rate <= 1.0 and complete)


def _overload(cfg, n, q):
    mplog.worker_init(cfg)
    log = logging.getLogger("over")
    pc = time.perf_counter_ns
    ts = []
    for i in range(n):
        t = pc()
        log.info("processed item %d of %d: loss=%.6f", i, n, i / 7)
        ts.append(pc() - t)
    ts.sort()
    q.put(ts[int(len(ts) * 0.99)] / 1000)


def overload(tmp: Path, n: int) -> None:
    ctx = multiprocessing.get_context("fork")
    for policy in ("drop", "block"):
        with mplog.LogService(tmp / f"over-{policy}", overflow=policy, level="INFO") as svc:
            q = ctx.Queue()
            procs = [ctx.Process(target=_overload, args=(svc.worker_config, n, q)) for _ in range(8)]
            for p in procs:
                p.start()
            p99 = sorted(q.get(timeout=300) for _ in procs)
            for p in procs:
                p.join()
            svc.flush(60)
        r = svc.health()["records"]
        counted = r["sent"] == r["written"] + r["dropped"] + r["lost"] + r["diverted"] == 8 * n
        in_file = _count_records(svc.full_path)
        if policy == "drop":
            report("overload, 8 writers, drop: caller p99 (us, worst writer)", p99[-1], "us", "< 1000",
                   p99[-1] < 1000 and counted and in_file == r["written"])
            print(f"    sent {r['sent']:,} written {r['written']:,} dropped {r['dropped']:,} (in file {in_file:,})")
        else:
            report("overload, 8 writers, block: records lost", r["lost"] + r["dropped"], "records", "0",
                   counted and r["lost"] == r["dropped"] == 0 and in_file == 8 * n)


def restart_latency(tmp: Path, kills: int) -> None:
    """SIGKILL the listener, log at once, time until that record is in the file: after a kill of
    a listener that had been up a while, and in a burst of kills. Either way the killed listener
    had come up and written what was waiting, so it was running normally and the supervisor
    starts its successor at once (the backoff is for listeners that die as they start)."""
    def one(svc: "mplog.LogService", log: logging.Logger, k: int) -> float:
        log.info("before kill %d", k)
        svc.flush(10)
        os.kill(svc.health()["listener"]["pid"], signal.SIGKILL)
        t0 = time.perf_counter()
        log.info("after kill %d", k)
        svc.flush(30)  # returns once a new listener has written it
        return time.perf_counter() - t0

    with mplog.LogService(tmp / "restart", degraded_restarts=1000) as svc:
        log = logging.getLogger("restart")
        single = []
        for k in range(3):
            time.sleep(1.0)  # a settled listener
            single.append(one(svc, log, k))
        burst = [one(svc, log, 100 + k) for k in range(kills)]
        lost = svc.health()["records"]["lost"]
    report("SIGKILL of a listener that was up: until the next record is written (s, worst of 3)",
           max(single), "s", "<= 3", max(single) <= 3)
    report(f"  in a burst of {kills} kills (s, worst; no backoff: each one had written)", max(burst), "s", "<= 3",
           max(burst) <= 3 and lost == 0)
    print("    burst: " + ", ".join(f"{t:.2f}" for t in burst) + f" s; records lost over all kills: {lost}")


def health_cost(tmp: Path) -> None:
    with mplog.LogService(tmp / "health") as svc:
        logging.getLogger("h").info("x")
        svc.flush(10)
        for _ in range(50):
            svc.health()
        t0 = time.perf_counter()
        n = 500
        for _ in range(n):
            svc.health()
        cost = (time.perf_counter() - t0) / n * 1000
    report("one health() call (ms)", cost, "ms", "< 1", cost < 1)


def start_stop_cost(tmp: Path, runs: int) -> None:
    """start() beside ``python -c "import mplog"`` (run in turn, so load hits both alike), and
    stop() of an idle service holding one record (issue 30)."""
    imports, starts, stops = [], [], []
    for k in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mplog"], check=True)
        imports.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        svc = mplog.LogService(tmp / "cost").start()
        starts.append(time.perf_counter() - t0)
        logging.getLogger("s").info("one")
        svc.flush(10)
        t0 = time.perf_counter()
        svc.stop()
        stops.append(time.perf_counter() - t0)
    imp, st, sp = (statistics.median(v) for v in (imports, starts, stops))
    print(f"    python -c 'import mplog' {imp * 1e3:.1f} ms, start() {st * 1e3:.1f} ms (medians of {runs})")
    report("start() / start-up of python -c 'import mplog' (median)", st / imp, "x", "<= 2", st <= 2 * imp)
    report("stop() of an idle service (s, median)", sp, "s", "<= 0.025", sp <= 0.025)


def _cycle_figures(root: str) -> Dict[str, int]:
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if "mplog" in line or root in line)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"fds": len(os.listdir("/proc/self/fd")), "maps": maps, "threads": threading.active_count(), "rss": rss}


def cycles(tmp: Path, n: int) -> None:
    """n start/log/stop cycles in this process (a notebook's cells): what is left (issue 29)."""
    from mplog._common.spool import spool_prefix, spool_root
    root = spool_root()
    # Only this file set's spools and this process's capture: others (same uid) share the root.
    mine = (spool_prefix(str(tmp / "cycles"), "run"), f"mplog-children-{os.getuid()}-{os.getpid()}-")
    env = lambda: {k: v for k, v in os.environ.items() if k == "PYTHONPATH" or k.startswith("MPLOG")}  # noqa: E731
    ours = lambda: {e for e in os.listdir(root) if e.startswith(mine)}  # noqa: E731
    for k in range(5):  # warm-up: imports, first allocations
        with mplog.LogService(tmp / "cycles"):
            logging.getLogger("c").info("warm-up %d", k)
    before, env0, spool0 = _cycle_figures(root), env(), ours()
    t0 = time.perf_counter()
    for k in range(n):
        with mplog.LogService(tmp / "cycles"):
            logging.getLogger("c").info("cycle %d", k)
    took = time.perf_counter() - t0
    after = _cycle_figures(root)
    print(f"    {n} cycles in {took:.1f} s: fds {before['fds']} -> {after['fds']}, maps {before['maps']} -> "
          f"{after['maps']}, threads {before['threads']} -> {after['threads']}, RSS {before['rss'] / 2**20:.1f} -> "
          f"{after['rss'] / 2**20:.1f} MB, env {'same' if env() == env0 else 'CHANGED'}, "
          f"spool entries {len(spool0)} -> {len(ours())}")
    same = (all(after[k] == before[k] for k in ("fds", "maps", "threads")) and env() == env0 and ours() == spool0)
    grown = (after["rss"] - before["rss"]) / 2**20
    report(f"{n} start/log/stop cycles: RSS growth, fds/maps/threads/env/spool same", grown, "MB",
           "<= 5, same", same and grown <= 5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    ap.add_argument("--listener-records", type=int, default=1_000_000,
                    help="records for the listener's RSS and CPU (issue 14 asks for 10,000,000)")
    ap.add_argument("--only", action="append", choices=[name for name, _f in TARGETS], metavar="NAME",
                    help="run only this target (repeatable): " + ", ".join(name for name, _f in TARGETS))
    ap.add_argument("--runs", type=int, default=None,
                    help="repeats of big-record-neighbour's scenarios (default 3; 1 with --quick)")
    args = ap.parse_args()
    print(f"mplog {mplog.__version__} targets  {time.strftime('%Y-%m-%dT%H:%M:%S')}  Python "
          f"{platform.python_version()}  {platform.system()} {platform.release()}  cores {os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"    mplog {_toolkit.mplog_source()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, run in TARGETS:
            if args.only is None or name in args.only:
                run(tmp, args)
    missed = [r[0] for r in ROWS if not r[4]]
    print(f"{len(ROWS) - len(missed)} of {len(ROWS)} targets met" + (f"; not met: {'; '.join(missed)}" if missed else ""))
    return 0


def _scale(args: argparse.Namespace) -> int:
    return 10 if args.quick else 1


# The targets by name, in the order of a full run (--only picks some).
TARGETS: List[Tuple[str, Callable[[Path, argparse.Namespace], None]]] = [
    ("start-latency", lambda tmp, a: start_latency(tmp, 5)),
    ("start-stop-cost", lambda tmp, a: start_stop_cost(tmp, 15)),
    ("cycles", lambda tmp, a: cycles(tmp, 1000 // _scale(a))),
    ("worker-init", lambda tmp, a: worker_init_cost(tmp)),
    ("health-cost", lambda tmp, a: health_cost(tmp)),
    ("restart", lambda tmp, a: restart_latency(tmp, 10)),
    ("worker-rss", lambda tmp, a: worker_rss_drop(tmp, 1_000_000 // _scale(a))),
    ("listener-rss-cpu", lambda tmp, a: listener_rss_and_cpu(tmp, a.listener_records // _scale(a))),
    ("drain", lambda tmp, a: drain(tmp, 100_000 // _scale(a))),
    ("overload", lambda tmp, a: overload(tmp, 50_000 // _scale(a))),
    ("big-record-neighbour", lambda tmp, a: targets_neighbour.big_record_neighbour(
        report, tmp, a.runs or (1 if a.quick else 3), 2.0 if a.quick else 4.0)),
]


if __name__ == "__main__":
    sys.exit(main())
