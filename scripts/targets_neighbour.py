"""The big-record-neighbour target of scripts/targets.py (issue 30, item 5): how long a small
record waits for the file beside a process that sends 4 MB records, after that process's SIGKILL
and while it lives. Run it with ``python scripts/targets.py --only big-record-neighbour``; see
``big_record_neighbour`` for how it is measured.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import mplog

Report = Callable[[str, float, str, str, bool], None]

BIG_SIZE = 4 * 1024 * 1024  # the big sender's records: over any ring's inline limit, files of their own
BIG_MAX = 60  # the killed sender stops at this many (240 MB): they fit the private tmpfs beside the rings
SMALL_EVERY = 0.01  # the small sender logs 100 records/s
POLL = 0.002  # the observer's pause when the full log has not grown
NEIGHBOUR_TMPFS = "400m"  # the spool's private tmpfs: a live 4 MB sender fills it, never /dev/shm
SMALL_LINE = re.compile(rb"Message: small (\d+) (\d+)\n")


def _big_sender(cfg: Any, n: int, count: Any, stop: Any) -> None:
    """Log up to ``n`` records of 4 MB, counting them in ``count``, until ``stop``; then wait
    (to be killed, or told to go)."""
    mplog.worker_init(cfg)
    log = logging.getLogger("big")
    blob = "x" * BIG_SIZE
    for i in range(n):
        if stop.value:
            break
        log.info("big %d %s", i, blob)
        count.value = i + 1
    deadline = time.monotonic() + 300
    while not stop.value and time.monotonic() < deadline:
        time.sleep(0.01)


def _small_sender(cfg: Any, count: Any, stop: Any) -> None:
    """Log a small record every SMALL_EVERY seconds until ``stop``, each carrying its number and
    the CLOCK_MONOTONIC time (ns, system-wide on Linux) just before the logging call."""
    mplog.worker_init(cfg)
    log = logging.getLogger("small")
    i = 0
    while not stop.value:
        log.info("small %d %d", i, time.monotonic_ns())
        i += 1
        count.value = i
        time.sleep(SMALL_EVERY)


class _Arrivals:
    """Reads the full log as it grows and notes, for each small record, the monotonic time at
    which the observer first saw it in the file; and whether the record of a process's SIGKILL
    is there yet. Each read takes what the file has gained (at most 64 MB); the last 256 bytes
    of the previous read are scanned again so that a line cut by a read is not missed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.keep = b""
        self.seen: Dict[int, Tuple[int, int]] = {}  # number -> (logged ns, seen ns)
        self.ends: Dict[int, int] = {}  # pid -> ns when its SIGKILL record was seen
        self.watch: List[int] = []

    def poll(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(64 * 2**20)
        except FileNotFoundError:
            return False
        now = time.monotonic_ns()
        if not chunk:
            return False
        self.offset += len(chunk)
        text = self.keep + chunk
        self.keep = text[-256:]
        for m in SMALL_LINE.finditer(text):
            self.seen.setdefault(int(m.group(1)), (int(m.group(2)), now))
        for pid in self.watch:
            if pid not in self.ends and f"(pid {pid}) was killed by SIGKILL".encode() in text:
                self.ends[pid] = now
        return True

    def until(self, done: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            if not self.poll():
                time.sleep(POLL)
        return True


def _neighbour_once(tmp: Path, queue_size: int, killed: bool, live_s: float) -> Dict[str, float]:
    """One run: a big sender (killed after BIG_MAX records, or the ring full; or live for
    ``live_s`` seconds) beside a small sender; the small records' delays in seconds."""
    ctx = multiprocessing.get_context("fork")
    out: Dict[str, float] = {}
    with mplog.LogService(tmp, queue_size=queue_size, level="INFO") as svc:
        spool = svc.health()["queue"]["spool"]
        root = os.environ["XDG_RUNTIME_DIR"]
        if not spool.startswith(root + os.sep):
            raise RuntimeError(f"the spool {spool} is not on the private tmpfs {root}")
        seen = _Arrivals(svc.full_path)
        # Lock-free shared words, not Values or Events: a process SIGKILLed while it holds
        # their lock would leave it held for everyone.
        big_n, small_n = ctx.RawValue("i", 0), ctx.RawValue("i", 0)
        big_stop, small_stop = ctx.RawValue("b", 0), ctx.RawValue("b", 0)
        small = ctx.Process(target=_small_sender, args=(svc.worker_config, small_n, small_stop), name="small")
        big = ctx.Process(target=_big_sender, args=(svc.worker_config, BIG_MAX if killed else 10**6, big_n, big_stop),
                          name="big")
        small.start()
        seen.until(lambda: 0 in seen.seen, 30)  # the small sender is up and its records arrive
        big.start()
        t_big = time.monotonic_ns()
        seen.watch.append(big.pid)
        try:
            t0 = time.monotonic()
            if killed:
                # Until BIG_MAX are logged, or the sender is stuck (its ring full: the tmpfs, or
                # queue_size), or 30 s.
                last, since = -1, time.monotonic()
                while big_n.value < BIG_MAX and time.monotonic() - t0 < 30:
                    if big_n.value != last:
                        last, since = big_n.value, time.monotonic()
                    elif time.monotonic() - since > 1.0:
                        break
                    if not seen.poll():
                        time.sleep(POLL)
                depth = svc.health()["queue"]["depth"]
                os.kill(big.pid, signal.SIGKILL)
                t_kill = time.monotonic_ns()
                out["big logged"] = big_n.value
                out["backlog at kill"] = depth
                # Small records go on until the record of its death is in the file, and 0.5 s more.
                # The observer keeps reading meanwhile: joining the killed process first (its
                # teardown took ~0.5 s here) would add that to every delay it measures.
                seen.until(lambda: big.pid in seen.ends, 120)
                big.join(30)
                end_at = seen.ends.get(big.pid)
                out["end written after kill (s)"] = (end_at - t_kill) / 1e9 if end_at else float("nan")
                seen.until(lambda: time.monotonic_ns() - (end_at or t_kill) > 5e8, 5)
            else:
                seen.until(lambda: time.monotonic() - t0 > live_s, live_s + 5)
                big_stop.value = 1  # the sender stops after its current record; the small one goes on
                t_kill = time.monotonic_ns()  # measured: small records logged before this moment
                big.join(60)
                out["big logged"] = big_n.value
                out["backlog at stop"] = svc.health()["queue"]["depth"]
            small_stop.value = 1
            small.join(30)
            sent = small_n.value
            seen.until(lambda: len(seen.seen) >= sent, 120)
        finally:
            big_stop.value = 1
            small_stop.value = 1
            for p in (big, small):
                if p.is_alive():
                    p.kill()
                p.join(10)
    if killed:
        chosen = [(t, s) for t, s in seen.seen.values() if t >= t_kill]
    else:
        chosen = [(t, s) for t, s in seen.seen.values() if t_big <= t < t_kill]
    delays = sorted((s - t) / 1e9 for t, s in chosen)
    out["small sent"] = sent
    out["small seen"] = len(seen.seen)
    out["measured"] = len(delays)
    out["median delay (s)"] = statistics.median(delays) if delays else float("nan")
    out["max delay (s)"] = delays[-1] if delays else float("nan")
    return out


def big_record_neighbour(report: Report, tmp: Path, runs: int, live_s: float = 4.0) -> None:
    """Fair to every process (issue 30, item 5): how long a small record waits for the file
    beside a process that sends 4 MB records, after that process's SIGKILL and while it lives.

    The spool is on a private tmpfs of NEIGHBOUR_TMPFS mounted for the run (XDG_RUNTIME_DIR; root
    only): a 4 MB sender fills whatever it is given (a default ring holds 10,000 records, 40 GB),
    and /dev/shm is shared. A small sender logs 100 records/s, each carrying CLOCK_MONOTONIC at
    the call; this process reads the full log as it grows and notes when it first sees each one:
    the delay is that minus the call's time. It is an upper bound on the time from the call to
    the file, by the observer's pause (2 ms) and read. ``killed``: the big sender logs up to 60
    records (or until its ring is full) and is SIGKILLed; measured are the small records logged
    after the kill, until its death's record is in the file and 0.5 s more. ``live``: the big
    sender logs for ``live_s`` seconds and stops; measured are the small records logged
    meanwhile. Each under queue_size=150 and the default, ``runs`` times."""
    mnt = Path(tempfile.mkdtemp(prefix="mplog-neighbour-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={NEIGHBOUR_TMPFS}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        print(f"    big-record-neighbour skipped: cannot mount a private tmpfs ({r.stderr.strip()}; needs root)")
        mnt.rmdir()
        return
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(mnt)
    try:
        for scenario in ("killed", "live"):
            for queue_size in (150, 10000):
                maxes = []
                for k in range(runs):
                    d = tmp / f"neighbour-{scenario}-{queue_size}-{k}"
                    res = _neighbour_once(d, queue_size, scenario == "killed", live_s)
                    shutil.rmtree(d, ignore_errors=True)  # gigabytes of 4 MB records
                    maxes.append(res["max delay (s)"])
                    print(f"    {scenario}, queue_size={queue_size}, run {k + 1}: " + ", ".join(
                        f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in res.items()), flush=True)
                    lost = res["small seen"] != res["small sent"]
                    if lost:
                        print(f"    NOTE: {res['small sent'] - res['small seen']} small records not seen in the file")
                worst = max(maxes)
                print(f"    {scenario}, queue_size={queue_size}: max delay min {min(maxes):.3f} median "
                      f"{statistics.median(maxes):.3f} max {worst:.3f} s over {runs} runs")
                what = "after the SIGKILL of a" if scenario == "killed" else "beside a live"
                report(f"small records' delay {what} 4 MB sender, queue_size={queue_size} (s, worst)", worst, "s",
                       "< 1", worst < 1)
    finally:
        if old is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = old
        subprocess.run(["umount", str(mnt)], capture_output=True)
        try:
            mnt.rmdir()
        except OSError:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
