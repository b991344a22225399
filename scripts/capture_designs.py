"""The two designs issue 13 weighed, measured side by side in one run.

A, the environment (what mplog does): the service publishes its worker config in a capture
directory named by ``MPLOG_CAPTURE``, with a ``sitecustomize.py`` first on ``PYTHONPATH``, and
wraps ``multiprocessing.spawn.get_preparation_data`` for forkserver children.

B, per library: while the service runs, a joblib backend registered as "loky" (the default)
that passes mplog's initializer to loky, and Dask's ``multiprocessing.initializer`` set to it.
Prototyped here with ``capture_children=False``, so only B acts.

Printed: which pools each design reaches (records of 20 in the full log); what A costs a Python
process that is not a pool worker, and a pool worker's start; and what a joblib call costs after
a second service starts with the workers warm (A reuses them, B makes loky start new ones,
because the initializer's arguments change).

    python scripts/capture_designs.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from capture_table import CASES, count, run_case  # noqa: E402

COVERAGE = ["joblib-default", "loky-reusable", "dask-processes", "spawn-pool", "forkserver-ppe"]


class design_b:
    """B's registrations, for the life of a ``with`` block."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc

    def __enter__(self) -> "design_b":
        import dask
        import joblib
        from joblib._parallel_backends import LokyBackend
        from joblib.parallel import BACKENDS

        import mplog
        cfg = self.svc.worker_config

        class MplogLoky(LokyBackend):  # type: ignore[misc]
            def configure(self, *args: Any, **kwargs: Any) -> Any:
                kwargs.setdefault("initializer", mplog.worker_init)
                kwargs.setdefault("initargs", (cfg,))
                return super().configure(*args, **kwargs)

        self.saved = BACKENDS["loky"]
        joblib.register_parallel_backend("loky", MplogLoky, make_default=True)
        self.dask = dask.config.set({"multiprocessing.initializer": functools.partial(mplog.worker_init, cfg)})
        return self

    def __exit__(self, *exc: Any) -> None:
        import joblib
        joblib.register_parallel_backend("loky", self.saved, make_default=True)
        self.dask.__exit__(None, None, None)


def coverage(case: str, design: str) -> Dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="mplog-designs-")
    if design == "A":
        out = run_case(case, directory)
    else:
        import mplog
        real = mplog.LogService

        def service(*args: Any, **kwargs: Any) -> Any:
            return _WithB(real(*args, capture_children=False, **kwargs))
        mplog.LogService = service  # type: ignore[misc]
        out = run_case(case, directory)
    return count(out["path"], out["main"])


class _WithB:
    def __init__(self, svc: Any) -> None:
        self.svc = svc

    def __enter__(self) -> Any:
        self.svc.__enter__()
        self.b = design_b(self.svc).__enter__()
        return self.svc

    def __exit__(self, *exc: Any) -> None:
        self.b.__exit__()
        self.svc.__exit__(*exc)


def interpreter_cost(repeat: int) -> Dict[str, float]:
    """ms to run ``python -c pass``, plain and under a running service's environment."""
    import mplog
    out: Dict[str, float] = {}
    env_off = dict(os.environ)
    with mplog.LogService(tempfile.mkdtemp(prefix="mplog-designs-"), name="t"):
        env_on = dict(os.environ)
        times: Dict[str, List[float]] = {"plain": [], "published": []}
        for _ in range(repeat):  # interleaved: a shared machine's load moves
            for label, env in (("plain", env_off), ("published", env_on)):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
                times[label].append((time.perf_counter() - t) * 1000)
    out.update({label: statistics.median(v) for label, v in times.items()})
    return out


def _noop() -> None:
    pass


def _init_then_noop(cfg: Any) -> None:
    import mplog
    mplog.worker_init(cfg)


def worker_start_cost(repeat: int) -> Dict[str, float]:
    """ms from Process.start() to join() of a spawn child that does nothing: with the capture
    off; captured (imports mplog, installs its handler); and with the capture off but calling
    worker_init itself, what an initializer costs (and design B's). Interleaved rounds."""
    import multiprocessing

    import mplog
    ctx = multiprocessing.get_context("spawn")
    times: Dict[str, List[float]] = {"without capture": [], "captured": [], "initializer": []}
    for _ in range(repeat):
        for label in times:
            with mplog.LogService(tempfile.mkdtemp(prefix="mplog-designs-"), name="t",
                                  capture_children=label == "captured") as svc:
                target, args = (_init_then_noop, (svc.worker_config,)) if label == "initializer" else (_noop, ())
                t = time.perf_counter()
                p = ctx.Process(target=target, args=args)
                p.start()
                p.join(60)
                times[label].append((time.perf_counter() - t) * 1000)
    return {label: statistics.median(v) for label, v in times.items()}


def _pid(i: int) -> int:
    return os.getpid()


def reuse_cost(design: str, repeat: int) -> Dict[str, Any]:
    """A joblib call (20 tasks, 2 workers) warm in a first service, then the first call in a
    second service: seconds, and whether the second service's workers are the first's."""
    import joblib

    import mplog
    rows: List[Dict[str, Any]] = []
    for _ in range(repeat):
        pids = []
        times = []
        for k in range(2):
            svc = mplog.LogService(tempfile.mkdtemp(prefix="mplog-designs-"), name="t",
                                   capture_children=design == "A")
            with svc:
                ctx = design_b(svc) if design == "B" else None
                if ctx is not None:
                    ctx.__enter__()
                try:
                    if k == 0:
                        joblib.Parallel(n_jobs=2)(joblib.delayed(_pid)(i) for i in range(20))  # warm
                    t = time.perf_counter()
                    got = joblib.Parallel(n_jobs=2)(joblib.delayed(_pid)(i) for i in range(20))
                    times.append(time.perf_counter() - t)
                    pids.append(set(got))
                finally:
                    if ctx is not None:
                        ctx.__exit__()
        rows.append({"warm": times[0], "after restart": times[1], "reused": bool(pids[0] & pids[1])})
    from joblib.externals.loky import get_reusable_executor
    get_reusable_executor().shutdown(wait=True)
    return {"warm": statistics.median(r["warm"] for r in rows),
            "after restart": statistics.median(r["after restart"] for r in rows),
            "reused": all(r["reused"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--coverage", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--reuse", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.coverage:
        print("RESULT " + json.dumps(coverage(*args.coverage)))
        return 0
    if args.reuse:
        print("RESULT " + json.dumps(reuse_cost(args.reuse, args.repeat)))
        return 0

    def sub(*extra: str) -> Dict[str, Any]:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *extra, "--repeat", str(args.repeat)],
                           capture_output=True, text=True, timeout=600)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{extra} failed:\n{r.stderr[-2000:]}")
        return json.loads(line[7:])

    from _provenance import mplog_source
    print(f"Python {sys.version.split()[0]}, mplog {mplog_source()}, {time.strftime('%Y-%m-%d')}, "
          f"load {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores\n")
    print("| pool (records of 20 in the full log) | A: environment | B: joblib backend + Dask config |")
    print("|---|---:|---:|")
    for case in COVERAGE:
        a, b = sub("--coverage", case, "A"), sub("--coverage", case, "B")
        print(f"| {CASES[case]} | {a['once']} | {b['once']} |")
    print()
    cost = interpreter_cost(args.repeat)
    print(f"- `python -c pass`, not a pool worker: {cost['plain']:.1f} ms plain, {cost['published']:.1f} ms "
          f"under a running service's environment (sitecustomize looks and leaves)")
    start = worker_start_cost(args.repeat)
    print(f"- a spawn child that does nothing, start to join: {start['without capture']:.1f} ms without mplog, "
          f"{start['captured']:.1f} ms captured, {start['initializer']:.1f} ms calling worker_init itself "
          f"(what an initializer, and design B, cost)")
    for design in ("A", "B"):
        r = sub("--reuse", design)
        print(f"- {design}: joblib.Parallel(n_jobs=2) of 20 tasks, warm {r['warm']:.3f} s; the first call in a "
              f"second service {r['after restart']:.3f} s; workers reused: {'yes' if r['reused'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
