"""How the benchmark runs one setup: the driver starts a fresh coordinator process per setup
(``run_setup``, bounded by --timeout, its process group killed after), the coordinator
(``coordinate``) starts the setup and its workers, releases them together and measures, and
each worker (``worker_main``) logs its records, timing every call.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

from _toolkit import group_members, kill, proc_stat, proc_status
from bench_setups import SETUP_CLASSES, Setup, worker_setup
from bench_verify import WARMUP, loss_value, worker_name

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")  # runs child_main on --_child


# ----------------------------------------------------------------------------------------------
# /proc helpers (Linux)
# ----------------------------------------------------------------------------------------------
def reset_peak_rss(pid: Any = "self") -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); harmless where unsupported."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb(pid: Any = "self") -> Optional[float]:
    peak = proc_status(pid, ("VmHWM",)).get("VmHWM")
    if peak is None and pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return None if peak is None else peak / 1048576.0


def shmem_mb(pid: Any = "self") -> Optional[float]:
    """RssShmem: shared memory pages mapped now (for mplog, the ring pages of the spool)."""
    shm = proc_status(pid, ("RssShmem",)).get("RssShmem")
    return None if shm is None else shm / 1048576.0


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------
def worker_main(setup: str, wid: int, n: int, arg: Any, barrier: Any, go: Any, conn: Any,
                timeout: float) -> None:
    try:
        log, msg, warm_msg, finalize = worker_setup(setup, arg)
        losses = [loss_value(wid, i) for i in range(n)]
        durs = [0] * n
        pc = time.perf_counter_ns
        for j in range(WARMUP):
            log(warm_msg, wid, j)
        overhead = [0] * 5000
        for k in range(5000):
            t = pc()
            overhead[k] = pc() - t
        overhead.sort()
        reset_peak_rss()
        barrier.wait(timeout)
        if not go.wait(timeout):
            raise TimeoutError("never released")
        cpu0 = time.process_time_ns()
        t_start = time.perf_counter()
        for i in range(n):
            t = pc()
            log(msg, wid, i, n, losses[i])
            durs[i] = pc() - t
        t_calls = time.perf_counter()
        shm_mb = shmem_mb()  # the spool's ring pages this worker maps (mplog), before the flush
        finalize()
        t_end = time.perf_counter()
        cpu1 = time.process_time_ns()
        durs.sort()
        slow = durs[bisect.bisect_right(durs, 1_000_000):]  # calls over 1 ms: blocked or preempted
        conn.send({
            "ok": True, "wid": wid, "pid": os.getpid(),
            "t_start": t_start, "t_calls": t_calls, "t_end": t_end,
            "cpu_s": (cpu1 - cpu0) / 1e9,
            "med_us": durs[n // 2] / 1000.0,
            "p99_us": durs[min(n - 1, int(0.99 * n))] / 1000.0,
            "max_us": durs[-1] / 1000.0,
            "mean_us": sum(durs) / n / 1000.0,
            "timer_ns": overhead[len(overhead) // 2],
            "slow_calls": len(slow),
            "slow_share": sum(slow) / 1e9 / max(1e-9, t_calls - t_start),
            "peak_rss_mb": peak_rss_mb(),
            "shm_mb": shm_mb,
        })
    except BaseException:  # noqa: B036 - report anything, the coordinator decides
        try:
            barrier.abort()
        except Exception:
            pass
        try:
            conn.send({"ok": False, "wid": wid, "pid": os.getpid(), "error": traceback.format_exc()})
        except Exception:
            pass
    finally:
        try:
            conn.close()
        except Exception:
            pass



# ----------------------------------------------------------------------------------------------
# Coordinator
# ----------------------------------------------------------------------------------------------
def system_busy_s() -> Optional[float]:
    """CPU-seconds all cores spent busy, machine-wide (to see other tenants' load)."""
    try:
        import psutil
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    except Exception:
        return None


def proc_cpu_s(pid: Optional[int]) -> Optional[float]:
    if pid is None:
        return None
    try:
        import psutil
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:
        return None


def collect(conns: List[Any], deadline: float) -> Dict[int, Dict[str, Any]]:
    results: Dict[int, Dict[str, Any]] = {}
    pending = list(conns)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(pending)} worker(s) did not finish before the timeout")
        for conn in multiprocessing.connection.wait(pending, timeout=min(left, 1.0)):
            pending.remove(conn)
            try:
                res = conn.recv()
            except EOFError:
                raise RuntimeError("a worker died without reporting") from None
            results[res["wid"]] = res
            if not res["ok"]:
                raise RuntimeError(f"worker {res['wid']} failed:\n{res['error']}")
    return results


def coordinate(spec: Dict[str, Any]) -> Dict[str, Any]:
    setup, procs, n = spec["setup"], spec["procs"], spec["records"]
    timeout = spec["timeout"]
    deadline = time.monotonic() + timeout
    result: Dict[str, Any] = {"setup": setup, "procs": procs, "records": procs * n, "ok": False,
                              "start_method": spec["start_method"]}
    ctx = multiprocessing.get_context(spec["start_method"])
    tmp = tempfile.mkdtemp(prefix="logs-", dir=spec["tmp"])
    workers: List[Any] = []
    s: Optional[Setup] = None
    phase = "start"
    try:
        s = SETUP_CLASSES[setup](setup, ctx, tmp, procs, n)
        s.start(deadline)
        phase = "starting workers"
        barrier = ctx.Barrier(procs + 1)
        go = ctx.Event()
        conns = []
        arg = s.worker_arg()
        for wid in range(procs):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=worker_main, name=worker_name(wid),
                            args=(setup, wid, n, arg, barrier, go, w, timeout))
            p.start()
            w.close()
            workers.append(p)
            conns.append(r)
        phase = "warm-up"
        try:
            barrier.wait(max(0.0, deadline - time.monotonic()))
        except threading.BrokenBarrierError:
            # A worker aborted it (its error comes through its pipe) or we timed out.
            for c in conns:
                if c.poll(2.0):
                    res = c.recv()
                    if not res.get("ok"):
                        raise RuntimeError(f"worker {res['wid']} failed:\n{res['error']}") from None
            raise TimeoutError("workers did not finish start-up and warm-up before the timeout") from None
        s.settle(deadline)
        wpid = s.writer_pid()
        if wpid is not None:
            reset_peak_rss(wpid)
        reset_peak_rss()
        cpu_w0 = proc_cpu_s(wpid)
        busy0 = system_busy_s()
        cpu_self0 = self_cpu_s()
        cpu_main0 = time.thread_time()
        phase = "logging"
        t0 = time.perf_counter()
        go.set()
        results = collect(conns, deadline)
        phase = "drain"
        s.drain(deadline)
        t_drained = time.perf_counter()
        cpu_main1 = time.thread_time()
        cpu_self1 = self_cpu_s()
        busy1 = system_busy_s()
        cpu_w1 = proc_cpu_s(wpid)
        phase = "measure"
        if s.writer == "workers":
            t_end = max(r["t_end"] for r in results.values())
        else:
            t_end = t_drained
        elapsed = t_end - t0
        total = procs * n
        res = list(results.values())
        med = sorted(r["med_us"] for r in res)
        p99 = sorted(r["p99_us"] for r in res)
        writer_cpu = None
        writer_rss = None
        if s.writer != "workers":
            other_threads = max(0.0, (cpu_self1 - cpu_self0) - (cpu_main1 - cpu_main0))
            writer_cpu = other_threads
            if wpid is not None:
                writer_cpu += (cpu_w1 or 0.0) - (cpu_w0 or 0.0)
                writer_rss = peak_rss_mb(wpid)
            else:
                writer_rss = peak_rss_mb()
        ours = (sum(r["cpu_s"] for r in res) + (cpu_self1 - cpu_self0)
                + ((cpu_w1 or 0.0) - (cpu_w0 or 0.0) if wpid is not None else 0.0))
        foreign = None
        if busy0 is not None and busy1 is not None and t_drained - t0 >= 0.5:
            # /proc/stat counts in 10 ms ticks: a shorter window says nothing.
            window = (t_drained - t0) * (os.cpu_count() or 1)
            foreign = min(1.0, max(0.0, (busy1 - busy0) - ours) / window)
        result.update({
            "foreign_cpu_share": foreign,
            # JSON only: with more workers than cores, preemption lands in these as much as blocking.
            "calls_over_1ms": sorted(r["slow_calls"] for r in res)[len(res) // 2],
            "time_share_calls_over_1ms": sorted(r["slow_share"] for r in res)[len(res) // 2],
            "seconds": elapsed,
            "rate": total / elapsed if elapsed > 0 else None,
            "caller_med_us": med[len(med) // 2],
            "caller_p99_us": p99[len(p99) // 2],
            "caller_p99_max_us": p99[-1],
            "caller_max_us": max(r["max_us"] for r in res),
            "timer_ns": sorted(r["timer_ns"] for r in res)[len(res) // 2],
            "worker_cpu_us": sum(r["cpu_s"] for r in res) / total * 1e6,
            "writer_cpu_us": None if writer_cpu is None else writer_cpu / total * 1e6,
            "writer": s.writer,
            "worker_rss_mb": max((r["peak_rss_mb"] or 0.0) for r in res),
            "worker_shm_mb": max((r.get("shm_mb") or 0.0) for r in res),
            "writer_rss_mb": writer_rss,
            "release_spread_ms": (max(r["t_start"] for r in res) - t0) * 1000,
            "calls_done_s": max(r["t_calls"] for r in res) - t0,
        })
        phase = "verify"
        pids = {r["wid"]: r["pid"] for r in res}
        result["verify"] = s.verify(pids)
        phase = "stop"
        t_stop = time.perf_counter()
        s.stop(deadline)
        # As a user's program ends: every record in the file *and* the service stopped.
        result["stop_s"] = time.perf_counter() - t_stop
        result["rate_to_stop"] = total / (elapsed + result["stop_s"]) if elapsed + result["stop_s"] > 0 else None
        for p in workers:
            p.join(max(0.1, min(10.0, deadline - time.monotonic())))
        result["ok"] = True
    except BaseException as exc:  # noqa: B036
        result["error"] = f"{phase}: {type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        # Workers first (a stopping mplog service would divert their backlog to stderr), then
        # the setup's own writer.
        for p in workers:
            if p.is_alive():
                p.kill()
        for p in workers:
            p.join(2.0)
        if s is not None and phase not in ("stop",):
            try:
                s.stop(time.monotonic() + 5.0)
            except BaseException:  # noqa: B036
                pass
    finally:
        for p in workers:
            if p.is_alive():
                p.kill()
                p.join(2.0)
                if s is not None:
                    s.notes.append(f"killed worker {p.name}")
        for p in multiprocessing.active_children():  # anything else we started and still runs
            if p.is_alive():
                p.kill()
                p.join(2.0)
                if s is not None:
                    s.notes.append(f"killed leftover process {p.name}")
        if s is not None:
            result["notes"] = s.notes
            result["extra"] = s.extra
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        result = coordinate(spec)
    except BaseException as exc:  # noqa: B036
        result = {"setup": spec.get("setup"), "procs": spec.get("procs"), "ok": False,
                  "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    # Free the queues, events and barriers now, so their semaphores are unlinked (under spawn
    # and forkserver the resource tracker would otherwise warn about leaked semaphores).
    gc.collect()
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter exit: multiprocessing's exit handler can hang on a queue nobody reads,
    # and everything we started has been ended above.
    os._exit(0)



# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def run_setup(setup: str, procs: int, args: argparse.Namespace) -> Dict[str, Any]:
    # The driver owns the temporary directory, so it is removed even when the coordinator is killed.
    tmp = tempfile.mkdtemp(prefix=f"mplog-bench-{setup}-")
    result_path = os.path.join(tmp, "result.json")
    spec = {"setup": setup, "procs": procs, "records": args.records, "start_method": args.start_method,
            "timeout": args.timeout, "result_path": result_path, "tmp": tmp}
    out = tempfile.TemporaryFile()
    started = time.monotonic()
    popen = subprocess.Popen([sys.executable, BENCH, "--_child", json.dumps(spec)],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    pgid = popen.pid
    timed_out = False
    try:
        popen.wait(args.timeout + 30)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill(pgid, group=True)
        popen.wait()
    except BaseException:
        kill(pgid, group=True)
        popen.wait()
        raise
    leftovers = ""
    # Whatever the coordinator started must be gone (an mplog listener drains and exits by
    # itself when its parent dies; give stragglers a moment, then kill the group).
    for _ in range(50):
        if not group_members(pgid):
            break
        time.sleep(0.1)
    else:
        try:
            import psutil
            names = [f"{p.pid}:{' '.join(p.cmdline()[:3])}" for p in psutil.process_iter()
                     if (proc_stat(p.pid) or ("", None))[1] == pgid]
        except Exception:
            names = []
        kill(pgid, group=True)
        leftovers = f"processes still running 5 s after the coordinator exited, killed: {names}"
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"setup": setup, "procs": procs, "ok": False,
                  "error": ("timed out after %.0f s: process group killed" % (time.monotonic() - started))
                  if timed_out else f"coordinator exited with {popen.returncode} without a result"}
    finally:
        stray = _remove_spools_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    if stray:
        result.setdefault("notes", []).append(f"removed {len(stray)} spool(s) left behind: {stray}")
    out.seek(0)
    text = out.read().decode("utf-8", "replace")
    out.close()
    if text.strip():
        lines = text.strip().splitlines()
        result["stderr"] = lines[:30] + ([f"... ({len(lines) - 30} more lines)"] if len(lines) > 30 else [])
    if leftovers:
        result.setdefault("notes", []).append(leftovers)
    result["wall_s"] = time.monotonic() - started
    return result


def _remove_spools_under(tmp: str) -> List[str]:
    """mplog's spools live beside the files' directory (tmpfs), not in it: remove those of file
    sets under ``tmp`` whose run is over (a coordinator killed at the timeout leaves one, with
    records in it, that no later run of that file set would ever recover)."""
    try:
        from mplog._common.spool import list_spools, remove_spool
    except Exception:
        return []
    real = os.path.realpath(tmp)
    removed = []
    for info in list_spools():
        if not info.alive and (info.directory == real or info.directory.startswith(real + os.sep)):
            remove_spool(info.path)
            removed.append(f"{info.path} ({info.unwritten} unwritten)")
    return removed

