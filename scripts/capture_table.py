"""Measure issue 13's table: pools made without mplog's initializer, with a LogService running.

Each case runs in a coordinator process of its own (a fresh program, as a new user would run
it): it starts a ``LogService``, runs twenty tasks on the pool, each logging one INFO record from
its worker, stops the service and counts those records in the full log (exactly once, from a
worker's pid, not the main process's).

    python scripts/capture_table.py [--cases joblib-default,dask-processes,...] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

N = 20
HEADER = re.compile(r"^\[[^\]]*\] \[([A-Z]+)\] \[([^\]]*)\] \[([^\]]*):(\d+)\] \[[^\]]*\]$")

CASES = {
    "joblib-default": "`joblib.Parallel(n_jobs=2)`, default backend",
    "joblib-loky": "`joblib.Parallel(n_jobs=2, backend=\"loky\")`",
    "loky-reusable": "`loky.get_reusable_executor(2)`",
    "dask-processes": "`dask.compute(..., scheduler=\"processes\", num_workers=2)`",
    "spawn-pool": "`multiprocessing.get_context(\"spawn\").Pool(2)`, no initializer",
    "forkserver-pool": "`multiprocessing.get_context(\"forkserver\").Pool(2)`, no initializer",
    "spawn-process": "`get_context(\"spawn\").Process`, no `worker_init`",
    "forkserver-ppe": "`ProcessPoolExecutor(2, mp_context=forkserver)`, no initializer",
    "nested-joblib": "a loky `Parallel(n_jobs=2)` inside a `joblib.Parallel` worker",
    "nested-ppe": "a forkserver `ProcessPoolExecutor(2)` inside a spawn one's worker, no initializer",
}
TABLE = ["joblib-default", "dask-processes", "spawn-pool", "forkserver-ppe"]


def run_case(case: str, directory: str) -> Dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import mplog
    from _capture_tasks import nested_joblib, nested_ppe, process_target, task

    with mplog.LogService(directory, name="t") as svc:
        if case in ("joblib-default", "joblib-loky", "nested-joblib"):
            import joblib
            kw = {"backend": "loky"} if case == "joblib-loky" else {}
            if case == "nested-joblib":
                joblib.Parallel(n_jobs=2)(joblib.delayed(nested_joblib)(k) for k in range(2))
            else:
                joblib.Parallel(n_jobs=2, **kw)(joblib.delayed(task)(i) for i in range(N))
        elif case == "loky-reusable":
            try:
                from loky import get_reusable_executor
            except ImportError:
                from joblib.externals.loky import get_reusable_executor
            list(get_reusable_executor(2).map(task, range(N)))
        elif case == "dask-processes":
            import dask
            dask.compute(*[dask.delayed(task)(i) for i in range(N)], scheduler="processes", num_workers=2)
        elif case in ("spawn-pool", "forkserver-pool"):
            with multiprocessing.get_context(case.split("-")[0]).Pool(2) as pool:
                pool.map(task, range(N))
        elif case == "spawn-process":
            ps = [multiprocessing.get_context("spawn").Process(target=process_target, args=(k,)) for k in range(2)]
            for p in ps:
                p.start()
            for p in ps:
                p.join(60)
        elif case == "nested-ppe":
            with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ppe:
                list(ppe.map(nested_ppe, range(2)))
        elif case == "forkserver-ppe":
            with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as ppe:
                list(ppe.map(task, range(N)))
        svc.flush(10)
        path = str(svc.full_path)
    return {"path": path, "main": os.getpid()}


def count(path: str, main_pid: int) -> Dict[str, Any]:
    seen: Counter = Counter()
    pids = set()
    pid = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = HEADER.match(line.rstrip("\n"))
            if m:
                pid = int(m.group(4))
                continue
            mm = re.match(r"^  Message: capture-table item (\d+)$", line.rstrip("\n"))
            if mm and pid != main_pid:
                seen[int(mm.group(1))] += 1
                pids.add(pid)
    once = sum(1 for i in range(N) if seen[i] == 1)
    dup = sum(c - 1 for c in seen.values() if c > 1)
    return {"once": once, "duplicated": dup, "worker_pids": len(pids)}


def coordinator(case: str) -> None:
    directory = tempfile.mkdtemp(prefix="mplog-table-")
    started = time.monotonic()
    out = run_case(case, directory)
    result = count(out["path"], out["main"])
    result["seconds"] = round(time.monotonic() - started, 2)
    print("RESULT " + json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--coordinate", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args()
    if args.coordinate:
        coordinator(args.coordinate)
        return 0
    from _provenance import mplog_source
    print(f"Python {sys.version.split()[0]}, mplog {mplog_source()}, {time.strftime('%Y-%m-%d')}")
    print(f"MPLOG_CAPTURE_CHILDREN={os.environ.get('MPLOG_CAPTURE_CHILDREN', '(unset)')}\n")
    print("| pool | records in the full log | duplicated | worker pids | s |")
    print("|---|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--coordinate", case],
                               capture_output=True, text=True, timeout=args.timeout)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"| {CASES[case]} | failed: {tail} | | | |")
                continue
            res = json.loads(line[7:])
            print(f"| {CASES[case]} | {res['once']} of {N} | {res['duplicated']} | {res['worker_pids']} | "
                  f"{res['seconds']} |")
        except subprocess.TimeoutExpired:
            print(f"| {CASES[case]} | timed out | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
