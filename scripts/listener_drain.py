#!/usr/bin/env python3
"""The listener's CPU per record, alone: one process spools a backlog, the listener drains it.

    python scripts/listener_drain.py [--records 200000] [--repeat 3] [--perf FILE]

The main process stops the listener (SIGSTOP), logs ``--records`` records in the benchmark's
format into its ring (sized to hold them all), lets the listener go (SIGCONT) and waits for
``flush()``; the listener's user and system CPU over the drain (psutil), divided by the records,
is what it costs to take, format and write one record with the default formats. Each repeat runs
the compiled code and then the Python code (``MPLOG_PURE_PYTHON=1`` when the service starts, so
the listener runs its Python loops), so the two are paired under the same noise; the ratio of
their CPU per record is printed with each repeat's. ``--perf FILE`` records one more compiled
drain, after the pairs (perf slows what it records), with ``perf record -g`` (when perf is
installed), for ``perf report -i FILE``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _provenance import mplog_source  # noqa: E402

MSG = "w%d processed item %d of %d: loss=%.6f"  # bench.py's record


def drain(records: int, pure: bool, perf_out: Optional[str]) -> Tuple[float, float, float]:
    """(records/s, user µs a record, system µs a record) of one drain."""
    import psutil

    import mplog
    if pure:
        os.environ["MPLOG_PURE_PYTHON"] = "1"
    else:
        os.environ.pop("MPLOG_PURE_PYTHON", None)
    directory = tempfile.mkdtemp(prefix="mplog-drain-")
    svc = mplog.LogService(directory, name="drain", level="INFO", queue_size=records + 1000,
                           overflow="block", console=None)
    perf = None
    try:
        svc.start()
        pid = svc.health()["listener"]["pid"]
        log = logging.getLogger("bench.worker")
        log.info("warm-up")
        if not svc.flush(30):
            raise RuntimeError("the listener did not write the warm-up record")
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(records):
                log.info(MSG, 1, i, records, 0.5 + i * 1e-7)
            if perf_out and shutil.which("perf"):
                perf = subprocess.Popen(["perf", "record", "-F", "4999", "-g", "-o", perf_out, "-p", str(pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)  # perf attaches; a script, not a test
            proc = psutil.Process(pid)
            c0 = proc.cpu_times()
            t0 = time.perf_counter()
        finally:
            os.kill(pid, signal.SIGCONT)
        if not svc.flush(300):
            raise RuntimeError("the listener did not drain the backlog in 300 s")
        t1 = time.perf_counter()
        c1 = proc.cpu_times()
        return records / (t1 - t0), (c1.user - c0.user) / records * 1e6, (c1.system - c0.system) / records * 1e6
    finally:
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        svc.stop()
        os.environ.pop("MPLOG_PURE_PYTHON", None)
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="records in the backlog (default 200000)")
    parser.add_argument("--repeat", type=int, default=3, help="pairs of drains (default 3)")
    parser.add_argument("--perf", metavar="FILE", help="then perf record one more compiled drain into FILE")
    args = parser.parse_args()
    if args.records < 1 or args.repeat < 1:
        parser.error("--records and --repeat must be at least 1")
    from mplog import _compiled
    print(f"mplog {mplog_source()}")
    if _compiled.speedups is None:
        print("mplog._speedups is not built: only the Python code can be measured")
    ratios = []
    for k in range(args.repeat):
        row = []
        for pure in ((False, True) if _compiled.speedups is not None else (True,)):
            rate, user, system = drain(args.records, pure, None)
            row.append(user + system)
            print(f"[{k + 1}/{args.repeat}] {'Python  ' if pure else 'compiled'} {rate:>9,.0f} records/s, "
                  f"listener {user:.2f} user + {system:.2f} system = {user + system:.2f} µs a record", flush=True)
        if len(row) == 2:
            ratios.append(row[1] / row[0])
    if args.perf:
        if shutil.which("perf") is None:
            print("--perf: perf is not installed")
        else:
            drain(args.records, False, args.perf)
            print(f"perf data of a compiled drain: perf report -i {args.perf} --no-children --sort symbol")
    if ratios:
        ratios.sort()
        print(f"Python / compiled, CPU a record: {ratios[(len(ratios) - 1) // 2]:.2f}x (each repeat: "
              + ", ".join(f"{r:.2f}" for r in ratios) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
