#!/usr/bin/env python3
"""What a user finds in the two logs after a worker is OOM-killed and after one segfaults
(issue 12). Prints the excerpts the README quotes.

    python scripts/worker_deaths.py [--start-method spawn] [--dir DIR]

A pipeline of ProcessPoolExecutor workers processes samples; one sample makes its worker
allocate memory without bound, another makes C code read address 0 (``ctypes.string_at(0)``).
Where this process may make a memory cgroup (root, cgroup v1 or a v2 memory controller), the
hungry worker runs in one limited to 200 MB and the kernel's OOM killer ends it, so the logs can
confirm it; elsewhere the worker is sent SIGKILL, as the OOM killer would send it, and the
logs say the OOM killer is the usual sender without confirming it. Both pools break
(BrokenProcessPool), as they would in a real run.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import mplog  # noqa: E402
from _provenance import mplog_source  # noqa: E402

log = logging.getLogger("pipeline")


def make_cgroup(limit: int) -> Tuple[Optional[str], str]:
    """(the cgroup.procs file of a new memory cgroup limited to ``limit`` bytes, its path), or
    (None, why not)."""
    name = f"mplog-demo-{os.getpid()}"
    v1 = "/sys/fs/cgroup/memory"
    try:
        if os.path.isdir(v1):
            path = os.path.join(v1, name)
            os.mkdir(path)
            for knob in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
                if os.path.exists(os.path.join(path, knob)):
                    with open(os.path.join(path, knob), "w") as f:
                        f.write(str(limit))
            return os.path.join(path, "cgroup.procs"), path
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            if "memory" not in f.read().split():
                return None, "no memory controller in cgroup v2"
        path = os.path.join("/sys/fs/cgroup", name)
        os.mkdir(path)
        for knob, value in (("memory.max", str(limit)), ("memory.swap.max", "0")):
            with open(os.path.join(path, knob), "w") as f:
                f.write(value)
        return os.path.join(path, "cgroup.procs"), path
    except OSError as exc:
        return None, f"cannot make a memory cgroup here ({exc.strerror})"


def init(config: Any, cgroup_procs: Optional[str]) -> None:
    if cgroup_procs:  # before mplog watches it, so the listener reads this cgroup's oom_kill count
        with open(cgroup_procs, "w") as f:
            f.write(str(os.getpid()))
    mplog.worker_init(config)


def align(sample: str) -> str:
    wlog = logging.getLogger("pipeline.align")
    wlog.info("aligning %s", sample)
    if sample == "S0042":
        wlog.info("%s: loading the reference index into memory", sample)
        if os.environ.get("DEMO_REAL_OOM"):
            hog: List[bytes] = []
            while True:
                hog.append(b"x" * (16 << 20))  # the OOM killer ends this
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer sends it
    if sample == "S0077":
        wlog.info("%s: calling the C aligner", sample)
        ctypes.string_at(0)  # a segfault in C code
    time.sleep(0.05)
    return sample


def stage(svc: Any, ctx: Any, samples: List[str], cgroup_procs: Optional[str]) -> None:
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=init, initargs=(svc.worker_config, cgroup_procs)) as pool:
        try:
            for done in pool.map(align, samples):
                log.info("aligned %s", done)
        except BrokenProcessPool as exc:
            log.error("stage failed: %s", exc)


def excerpt(path: str, pids: List[int], full: bool) -> str:
    """The records of the dead workers, and of their ends, from one log."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not full:
        return "".join(ln + "\n" for ln in text.splitlines()
                       if any(f"(pid {p})" in ln for p in pids) or "stage failed" in ln)
    blocks = text.split("-" * 72 + "\n")
    keep = [b for b in blocks if any(f":{p}] " in b.split("\n", 1)[0] for p in pids)]
    return "".join(b + "-" * 72 + "\n" for b in keep)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-method", default="forkserver", choices=("fork", "spawn", "forkserver"))
    parser.add_argument("--dir", default=None, help="where the logs go (default: a temporary directory)")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="mplog-deaths-")
    ctx = multiprocessing.get_context(args.start_method)
    procs, cgroup = make_cgroup(200 << 20)
    if procs:
        os.environ["DEMO_REAL_OOM"] = "1"
    print(f"mplog {mplog_source()}; Python {sys.version.split()[0]}; {args.start_method}; "
          f"kernel {os.uname().release}; {'a real OOM kill in ' + cgroup if procs else 'SIGKILL: ' + cgroup}")
    try:
        with mplog.LogService(directory, name="run") as svc:
            log.info("pipeline started")
            stage(svc, ctx, ["S0040", "S0041", "S0042", "S0043"], procs)  # S0042 runs out of memory
            stage(svc, ctx, ["S0076", "S0077", "S0078"], None)  # S0077 crashes in C code
            deadline = time.monotonic() + 30
            while svc.health()["workers"]["live"] and time.monotonic() < deadline:
                time.sleep(0.05)  # until every worker's end is written
            workers = svc.health()["workers"]
    finally:
        if procs:
            for _ in range(100):
                try:
                    os.rmdir(cgroup)
                    break
                except OSError:
                    time.sleep(0.05)
    ended = [e["pid"] for e in workers["abnormal_exits"]]
    dead = [e["pid"] for e in workers["abnormal_exits"] if e["cause"] in ("SIGKILL(-9)", "SIGSEGV(-11)", "UNKNOWN")]
    simp = os.path.join(directory, "run.log")
    full = os.path.join(directory, "run.debug.log")
    print(f"\n== {simp} (its lines about the workers that ended)\n")
    print(excerpt(simp, ended, full=False))
    print(f"== {full} (the dead workers' records)\n")
    print(excerpt(full, dead, full=True))
    print("== health()['workers']\n")
    import json
    print(json.dumps(workers, indent=1))
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
