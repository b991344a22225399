"""Measure the transports mplog weighed for its spool, side by side in one run (issue 10).

Per record of a typical formatted payload (~350 bytes), from one Python process: the cost of
handing it over (the caller's share), and what a stalled reader lets a caller put in before it
must wait. Printed as a table; ratios are to the FIFO mplog used before the spool.

    python scripts/spool_alternatives.py [--records N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mplog._spool import RingWriter, ring_capacity  # noqa: E402
from mplog._transport import K_RECORD, FifoWriter, set_pipe_size  # noqa: E402

PAYLOAD = b"x" * 350


def time_fifo(n: int) -> tuple:
    d = tempfile.mkdtemp()
    path = os.path.join(d, "fifo")
    os.mkfifo(path, 0o600)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    size = set_pipe_size(r, 10000 * 320)
    w = FifoWriter(path)
    fit = 0
    while w.write_record(K_RECORD, PAYLOAD, 0.0):  # a stalled reader: how many fit
        fit += 1
    while True:
        try:
            if not os.read(r, 1 << 20):
                break
        except BlockingIOError:
            break
    t0 = time.perf_counter()
    for i in range(n):
        w.write_record(K_RECORD, PAYLOAD, 0.0)
        if i % 2000 == 1999:
            try:
                while os.read(r, 1 << 20):
                    pass
            except BlockingIOError:
                pass
    dt = (time.perf_counter() - t0) / n
    w.close()
    os.close(r)
    return dt, fit, size


def time_ring(n: int) -> tuple:
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    cap = ring_capacity(10000)
    ring = RingWriter(os.path.join(d, "ring.0"), cap, 10000)
    fit = 0
    while ring.write(PAYLOAD):
        fit += 1
    ring.words[8] = ring.words[4]  # the reader catches up (tail = head)
    ring.words[9] = ring.words[5]
    t0 = time.perf_counter()
    for i in range(n):
        if not ring.write(PAYLOAD):
            ring.words[8] = ring.words[4]
            ring.words[9] = ring.words[5]
            ring.write(PAYLOAD)
    dt = (time.perf_counter() - t0) / n
    ring.close()
    return dt, fit, cap


def time_mp_queue(n: int) -> tuple:
    q: "multiprocessing.Queue[bytes]" = multiprocessing.get_context("spawn").Queue()
    t0 = time.perf_counter()
    for i in range(n):
        q.put(PAYLOAD)
    dt = (time.perf_counter() - t0) / n
    for _ in range(n):
        q.get()
    q.close()
    q.join_thread()
    return dt, "unbounded (feeder thread's memory)", "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rows = {}
    for name, fn in (("FIFO, one write() per record (before)", time_fifo),
                     ("ring per process in /dev/shm (the spool)", time_ring),
                     ("multiprocessing.Queue.put", lambda n: time_mp_queue(min(n, 50_000)))):
        runs = [fn(a.records) for _ in range(a.repeat)]
        rows[name] = (statistics.median(r[0] for r in runs), runs[0][1], runs[0][2])
    base = rows["FIFO, one write() per record (before)"][0]
    print(f"{'transport':<44} {'µs/record':>10} {'vs FIFO':>8}  records that fit a stalled reader (bytes)")
    for name, (dt, fit, size) in rows.items():
        print(f"{name:<44} {dt * 1e6:>10.2f} {dt / base:>7.2f}x  {fit} ({size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
