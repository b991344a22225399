#!/usr/bin/env python3
"""Benchmark mplog against the ways Python programs usually log from several processes.

    python scripts/bench.py                                   # P=2 and P=8, 20000 records each, fork
    python scripts/bench.py --start-method spawn --procs 2
    python scripts/bench.py --only mplog,stdlib-queue --records 5000 --json out.json --markdown

Setups (all run in the same invocation, one after the other, each in a fresh "coordinator"
process so that no setup inherits another's logging state):

  floor                   Logger.info into a NullHandler: the cost no handler can avoid
  filehandler             every worker appends to one file with its own FileHandler (unsafe)
  stdlib-queue            QueueHandler -> multiprocessing.Queue -> QueueListener thread -> FileHandler
  stdlib-cookbook         QueueHandler -> multiprocessing.Queue -> listener *process* -> FileHandler
  mplog                   mplog.LogService(level="INFO", overflow="block"): both files written
  loguru                  loguru logger.add(file, enqueue=True)                    (if importable)
  concurrent-log-handler  ConcurrentRotatingFileHandler in every worker               (if importable)
  multiprocessing-logging install_mp_handler() around a FileHandler (fork only)      (if importable)

Workers are ``multiprocessing`` processes of the chosen start method that first run what a pool
initializer would (for mplog: ``svc.pool_kwargs()``), then log 100 warm-up records, wait at a
barrier and are released together by one Event (plain Processes rather than a Pool, so that each
worker gets exactly one task and the barrier cannot deadlock). Every record is
``logger.info("w%d processed item %d of %d: loss=%.6f", wid, i, n, x)`` (the loguru equivalent
for loguru), with the stdlib format ``%(asctime)s %(levelname)s %(processName)s %(name)s:
%(message)s``.

What is measured, per setup and worker count P (each worker logs N records):

* records/s: P*N / (time from the moment the workers are released together, after start-up and
  a warm-up of 100 records each, until every record is in the file). "In the file" means: the
  workers returned (file handlers), the listener drained up to a sentinel (queue setups),
  ``svc.flush()`` returned True (mplog), ``logger.complete()`` returned (loguru).
* records/s to stop(): the same records over that time plus the setup's stop (``svc.stop()``,
  ``QueueListener.stop()``, handlers closed), timed on its own after the files are verified:
  the end of a user's program, which waits for both.
* caller cost: every logging call is timed on its own with ``time.perf_counter_ns()``; each
  worker reports its median and p99; the table shows the median over workers. The timer's own
  overhead (measured, printed in the header) is included, not subtracted.
* writer CPU µs/record: CPU of whatever writes the file — the listener process (psutil
  ``cpu_times`` of its pid, before and after) plus every thread of the coordinator process other
  than its main thread (the QueueListener/loguru/multiprocessing-logging writer threads, mplog's
  supervisor). Workers' CPU µs/record: ``process_time`` of every worker (all its threads, feeder
  threads included), summed.
* peak RSS: ``VmHWM`` of each worker (max over workers) and of the writer (the listener process,
  or the coordinator process when the writer is a thread: marked ``*``); both peaks are reset
  (``/proc/PID/clear_refs``) just before the workers are released. For mplog both include the
  pages of the spool's rings that the process touched (shared memory on tmpfs: a worker its own
  ring, the listener every ring it read); the spool's own usage at the flush is in the notes.
  In brackets after the worker's peak: the shared pages it mapped when its last call returned
  (``RssShmem``, max over workers): for mplog, its ring's backlog, which is bounded by queue_size.
* caller overhead vs filehandler overhead: (mplog - floor) / (filehandler - floor) of the
  median call, the measure of issue 14 (<= 0.5 is the target).
* verification: every record carries a (worker, item) pair and a checkable value; the output
  file(s) are parsed and each record must be there exactly once and intact. lost = missing,
  dup = extra copies, torn = lines/blocks that are not a well-formed record. For mplog both the
  full log (blocks) and the simplified log (lines) are checked and the counts are added up, and
  after ``stop()`` the service's spool directory must be gone (one left behind, by a stop that
  could not drain or a coordinator killed at the timeout, is noted and removed by the driver).

The machine may be shared: for each run the CPU that *other* processes used during the
measurement window is printed ("noise"; "-" for windows under 0.5 s, which /proc/stat's 10 ms
ticks cannot resolve); use --repeat K to run everything K times (interleaved)
and keep the run with the median records/s. The header says which mplog was measured (path, git
commit, uncommitted changes).

Every setup is bounded by --timeout seconds: its whole process group is killed and the setup is
reported as failed. Nothing here asserts on speed: this is a measurement script.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import gc
import json
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from _toolkit import mplog_source  # scripts/ is on sys.path when a script runs

SETUPS = ["floor", "filehandler", "stdlib-queue", "stdlib-cookbook", "mplog",
          "loguru", "concurrent-log-handler", "multiprocessing-logging"]
# mplog with its compiled code turned off (MPLOG_PURE_PYTHON=1): what an install without a
# compiler gets. Only with --only: it measures mplog against itself, not against the peers.
EXTRA_SETUPS = ["mplog-python"]
PEERS = {  # optional setup -> (import name, pip name)
    "loguru": ("loguru", "loguru"),
    "concurrent-log-handler": ("concurrent_log_handler", "concurrent-log-handler"),
    "multiprocessing-logging": ("multiprocessing_logging", "multiprocessing-logging"),
}
QUEUE_PEERS = ("stdlib-queue", "stdlib-cookbook", "loguru", "multiprocessing-logging")

FMT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
LOGURU_FMT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level} {process.name} {name}: {message}"
MSG = "w%d processed item %d of %d: loss=%.6f"
WARM_MSG = "w%d warmup %d"
LOGURU_MSG = "w{} processed item {} of {}: loss={:.6f}"
LOGURU_WARM_MSG = "w{} warmup {}"
LOGGER_NAME = "bench"
WARMUP = 100
SEP = "-" * 72


def loss_value(wid: int, i: int) -> float:
    """The value worker ``wid`` logs for item ``i``: deterministic, so the verifier can check it."""
    return ((wid * 1000003 + i) * 0.6180339887498949) % 1.0


def worker_name(wid: int) -> str:
    return f"bench-w{wid}"


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


def _status_mb(field: str, pid: Any = "self") -> Optional[float]:
    """One ``kB`` line of /proc/PID/status, in MB (None where there is none)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb(pid: Any = "self") -> Optional[float]:
    peak = _status_mb("VmHWM", pid)
    if peak is None and pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return peak


def shmem_mb(pid: Any = "self") -> Optional[float]:
    """RssShmem: shared memory pages mapped now (for mplog, the ring pages of the spool)."""
    return _status_mb("RssShmem", pid)


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ----------------------------------------------------------------------------------------------
# Worker side (module level: must be importable under spawn and forkserver)
# ----------------------------------------------------------------------------------------------
def _set_root(handler: Optional[logging.Handler]) -> None:
    # A forked child inherits the parent's root handlers: replace them, do not add to them.
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    if handler is not None:
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def _file_handler(path: str) -> logging.Handler:
    handler = logging.FileHandler(path, "a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FMT))
    return handler


def worker_setup(setup: str, arg: Any) -> Tuple[Callable[..., Any], str, str, Callable[[], None]]:
    """What a pool initializer would do for ``setup``. Returns (log call, message, warm-up
    message, finalize). ``finalize`` runs after the last call and is inside the timed window
    (it pushes out whatever the process still buffers)."""
    info = logging.getLogger(LOGGER_NAME).info
    nothing: Callable[[], None] = lambda: None
    if setup == "floor":
        _set_root(logging.NullHandler())
        return info, MSG, WARM_MSG, nothing
    if setup == "filehandler":
        handler = _file_handler(arg)
        _set_root(handler)

        def close() -> None:
            handler.flush()
            handler.close()
        return info, MSG, WARM_MSG, close
    if setup in ("stdlib-queue", "stdlib-cookbook"):
        queue = arg
        _set_root(logging.handlers.QueueHandler(queue))

        def drain_feeder() -> None:
            queue.close()
            queue.join_thread()  # the feeder thread has written everything to the pipe
        return info, MSG, WARM_MSG, drain_feeder
    if setup in ("mplog", "mplog-python"):
        import mplog
        arg["initializer"](*arg["initargs"])  # svc.pool_kwargs(), as a Pool would call it
        if mplog.current_config() is None:
            raise RuntimeError("mplog.worker_init did not install the handler (see stderr)")
        return info, MSG, WARM_MSG, nothing
    if setup == "loguru":
        logger = arg  # the parent's logger (inherited under fork, pickled under spawn)
        return logger.info, LOGURU_MSG, LOGURU_WARM_MSG, nothing  # SimpleQueue.put is synchronous
    if setup == "concurrent-log-handler":
        from concurrent_log_handler import ConcurrentRotatingFileHandler
        handler = ConcurrentRotatingFileHandler(arg, "a", maxBytes=0, backupCount=0, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FMT))
        _set_root(handler)
        return info, MSG, WARM_MSG, handler.close
    if setup == "multiprocessing-logging":
        from multiprocessing_logging import MultiProcessingHandler
        mp_handlers = [h for h in logging.getLogger().handlers if isinstance(h, MultiProcessingHandler)]
        if not mp_handlers:
            raise RuntimeError("no MultiProcessingHandler inherited (multiprocessing-logging needs fork)")
        queue = mp_handlers[0].queue

        def drain_feeder_mpl() -> None:
            queue.close()
            queue.join_thread()
        return info, MSG, WARM_MSG, drain_feeder_mpl
    raise ValueError(f"unknown setup {setup!r}")


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


def cookbook_listener(queue: Any, path: str, drained: Any, release: Any, timeout: float) -> None:
    """The logging cookbook's listener process: read records from the queue, handle them."""
    handler = _file_handler(path)
    _set_root(handler)
    while True:
        record = queue.get()
        if record is None:  # the sentinel
            break
        logging.getLogger(record.name).handle(record)
    handler.flush()
    drained.set()
    release.wait(timeout)  # stay alive so the coordinator can read our CPU and peak RSS
    handler.close()


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------
BODY_RE = re.compile(r"w(\d+) (?:processed item (\d+) of (\d+): loss=(\d\.\d{6})|warmup (\d+))\Z")
LINE_RE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d{3} (?P<lvl>[A-Z]+) (?P<pn>\S+) (?P<lg>\S+): (?P<body>.*)\Z")
FULL_HDR_RE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[(?P<lvl>[A-Z]+)\] \[(?P<lg>[^\]]*)\] "
                         r"\[(?P<pn>[^\]]*):(?P<pid>\d+)\] \[(?P<file>[^\]]*):(?P<line>\d+)\]\Z")
SIMP_RE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (?P<msg>.*)\Z")
MESSAGE_PREFIX = "  Message: "


class Tally:
    def __init__(self, procs: int, n: int) -> None:
        self.procs = procs
        self.n = n
        self.counts = bytearray(procs * n)
        self.warmup = 0
        self.torn = 0
        self.notices: List[str] = []
        self.examples: List[str] = []

    def body(self, body: str, wid_check: Optional[Callable[[int], bool]] = None) -> bool:
        m = BODY_RE.match(body)
        if not m:
            return False
        wid = int(m.group(1))
        if wid >= self.procs or (wid_check is not None and not wid_check(wid)):
            return False
        if m.group(5) is not None:
            self.warmup += 1
            return True
        i, of = int(m.group(2)), int(m.group(3))
        if i >= self.n or of != self.n or m.group(4) != "%.6f" % loss_value(wid, i):
            return False
        k = wid * self.n + i
        if self.counts[k] < 255:
            self.counts[k] += 1
        return True

    def bad(self, text: str, why: str = "") -> None:
        self.torn += 1
        if len(self.examples) < 3:
            self.examples.append((why + ": " if why else "") + repr(text[:160]))

    def summary(self) -> Dict[str, Any]:
        counts = self.counts
        lost = counts.count(0)
        dup = sum(c - 1 for c in counts if c > 1)
        return {"expected": len(counts), "found": len(counts) - lost, "lost": lost, "dup": dup,
                "torn": self.torn, "warmup_lines": self.warmup, "notices": len(self.notices),
                "notice_texts": self.notices[:5], "bad_examples": self.examples}


def _lines(path: str):
    # Raw text: no newline translation, undecodable bytes visible as U+FFFD (counted torn).
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        for raw in f:
            if raw.endswith("\n"):
                yield raw[:-1], True
            else:
                yield raw, False


def verify_lines(path: str, procs: int, n: int, logger_name: Optional[str]) -> Dict[str, Any]:
    """One line per record: stdlib FMT, or the same layout from loguru."""
    t = Tally(procs, n)
    if os.path.exists(path):
        for line, complete in _lines(path):
            if not complete:
                t.bad(line, "unterminated last line")
                continue
            m = LINE_RE.match(line)
            if not m:
                t.bad(line)
                continue
            if m["lvl"] != "INFO" or (logger_name and m["lg"] != logger_name):
                t.bad(line, "level/logger")
                continue
            pn = m["pn"]
            if not t.body(m["body"], lambda wid: pn == worker_name(wid)):
                t.bad(line)
    return t.summary()


def verify_mplog_full(path: str, procs: int, n: int, pids: Dict[int, int]) -> Tuple[Dict[str, Any], set]:
    """Blocks: header, '  Message: ...', separator. mplog's own notices (logger 'mplog') are
    set aside; returns the tally and the first lines of those notices."""
    t = Tally(procs, n)
    notice_firsts = set()

    def block_done(block: List[str]) -> None:
        if not block:
            t.bad("", "empty block")
            return
        m = FULL_HDR_RE.match(block[0])
        if not m:
            t.bad(" | ".join(block), "bad header")
            return
        if m["lg"] == "mplog":
            text = block[1][len(MESSAGE_PREFIX):] if len(block) > 1 and block[1].startswith(MESSAGE_PREFIX) else ""
            t.notices.append(text[:200])
            notice_firsts.add(text)
            return
        if len(block) != 2 or not block[1].startswith(MESSAGE_PREFIX):
            t.bad(" | ".join(block), "block shape")
            return
        if m["lvl"] != "INFO" or m["lg"] != LOGGER_NAME or m["file"] != "bench.py":
            t.bad(block[0], "header fields")
            return
        pn, pid = m["pn"], int(m["pid"])
        ok = t.body(block[1][len(MESSAGE_PREFIX):],
                    lambda wid: pn == worker_name(wid) and pids.get(wid) in (None, pid))
        if not ok:
            t.bad(" | ".join(block), "message")

    block: List[str] = []
    if os.path.exists(path):
        for line, complete in _lines(path):
            if not complete:
                block.append(line)
                break
            if line == SEP:
                block_done(block)
                block = []
            else:
                block.append(line)
    if block:
        t.bad(" | ".join(block), "incomplete block at end of file")
    return t.summary(), notice_firsts


def verify_mplog_simple(path: str, procs: int, n: int, notice_firsts: set) -> Dict[str, Any]:
    t = Tally(procs, n)
    in_notice = False
    if os.path.exists(path):
        for line, complete in _lines(path):
            if not complete:
                t.bad(line, "unterminated last line")
                continue
            if line.startswith(" "):  # continuation of a multi-line message
                if not in_notice:
                    t.bad(line, "stray continuation")
                continue
            m = SIMP_RE.match(line)
            if not m:
                t.bad(line)
                in_notice = False
                continue
            msg = m["msg"]
            if t.body(msg):
                in_notice = False
                continue
            text = re.sub(r"\A(?:WARNING|ERROR|CRITICAL): ", "", msg)
            if text in notice_firsts:
                t.notices.append(text[:200])
                in_notice = True
                continue
            t.bad(line)
            in_notice = False
    return t.summary()


def add_verifications(parts: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    total = {"lost": 0, "dup": 0, "torn": 0}
    for part in parts.values():
        for key in total:
            total[key] += part[key]
    total["files"] = parts
    return total


# ----------------------------------------------------------------------------------------------
# Coordinator side: one class per setup
# ----------------------------------------------------------------------------------------------
def call_with_timeout(fn: Callable[[], Any], timeout: float) -> Tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (finished, result or exception)."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: B036
            box["error"] = exc
    thread = threading.Thread(target=run, name="bench-call", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout))
    if thread.is_alive():
        return False, None
    if "error" in box:
        return True, box["error"]
    return True, box.get("result")


class Setup:
    writer = "workers"  # "workers", "thread" (in the coordinator) or "process"

    def __init__(self, name: str, ctx: Any, tmp: str, procs: int, n: int) -> None:
        self.name = name
        self.ctx = ctx
        self.tmp = tmp
        self.procs = procs
        self.n = n
        self.path = os.path.join(tmp, "bench.log")
        self.notes: List[str] = []
        self.extra: Dict[str, Any] = {}

    def start(self, deadline: float) -> None:
        pass

    def worker_arg(self) -> Any:
        return self.path

    def settle(self, deadline: float) -> None:
        time.sleep(0.5)  # let the writer take the warm-up records

    def writer_pid(self) -> Optional[int]:
        return None

    def drain(self, deadline: float) -> None:
        """Return once every record is in the file; raise on failure or timeout."""

    def verify(self, pids: Dict[int, int]) -> Optional[Dict[str, Any]]:
        return add_verifications({"log": verify_lines(self.path, self.procs, self.n, LOGGER_NAME)})

    def stop(self, deadline: float) -> None:
        pass


class Floor(Setup):
    def worker_arg(self) -> Any:
        return None

    def settle(self, deadline: float) -> None:
        time.sleep(0.2)

    def verify(self, pids: Dict[int, int]) -> Optional[Dict[str, Any]]:
        return None


class FileHandlerSetup(Setup):
    pass


class ConcurrentLogHandlerSetup(Setup):
    pass


class StdlibQueue(Setup):
    writer = "thread"

    def start(self, deadline: float) -> None:
        self.queue = self.ctx.Queue()
        self.handler = _file_handler(self.path)
        self.listener = logging.handlers.QueueListener(self.queue, self.handler)
        self.listener.start()

    def worker_arg(self) -> Any:
        return self.queue

    def drain(self, deadline: float) -> None:
        done, err = call_with_timeout(self.listener.stop, deadline - time.monotonic())
        if not done:
            raise TimeoutError("QueueListener did not drain before the timeout")
        if isinstance(err, BaseException):
            raise err
        self.handler.flush()

    def stop(self, deadline: float) -> None:
        self.handler.close()


class StdlibCookbook(Setup):
    writer = "process"

    def start(self, deadline: float) -> None:
        self.queue = self.ctx.Queue()
        self.drained = self.ctx.Event()
        self.release = self.ctx.Event()
        self.proc = self.ctx.Process(target=cookbook_listener, name="bench-listener",
                                     args=(self.queue, self.path, self.drained, self.release,
                                           max(1.0, deadline - time.monotonic())))
        self.proc.start()

    def worker_arg(self) -> Any:
        return self.queue

    def writer_pid(self) -> Optional[int]:
        return self.proc.pid

    def drain(self, deadline: float) -> None:
        self.queue.put(None)
        if not self.drained.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the cookbook listener process did not drain before the timeout")

    def stop(self, deadline: float) -> None:
        self.release.set()
        self.proc.join(max(1.0, min(10.0, deadline - time.monotonic())))
        if self.proc.is_alive():  # it never got the sentinel (a failed run): end it
            self.proc.kill()
            self.proc.join(2.0)
            self.notes.append("killed the cookbook listener process")
        elif self.proc.exitcode != 0:
            self.notes.append(f"cookbook listener exit code {self.proc.exitcode}")
        self.queue.cancel_join_thread()  # never hang at exit on the sentinel's feeder


class MplogSetup(Setup):
    writer = "process"
    _pids: Dict[int, int] = {}
    _at_flush: Tuple[int, int, int] = (0, 0, 0)

    def start(self, deadline: float) -> None:
        import mplog
        self.svc = mplog.LogService(self.tmp, name="bench", level="INFO", overflow="block")
        self.svc.start()
        self.simple_path = str(self.svc.simplified_path)
        self.full_path = str(self.svc.full_path)
        health = self.svc.health()
        self.listener_pid = health["listener"]["pid"]
        self.spool = health["queue"].get("spool")

    def worker_arg(self) -> Any:
        return self.svc.pool_kwargs()

    def settle(self, deadline: float) -> None:
        if not self.svc.flush(timeout=max(1.0, deadline - time.monotonic())):
            raise TimeoutError("mplog flush (after warm-up) returned False")
        time.sleep(0.2)

    def writer_pid(self) -> Optional[int]:
        return self.listener_pid

    def drain(self, deadline: float) -> None:
        if not self.svc.flush(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("svc.flush() returned False before the timeout")

    def verify(self, pids: Dict[int, int]) -> Optional[Dict[str, Any]]:
        health = self.svc.health()
        self.extra["health_at_flush"] = {"records": health.get("records"), "restarts": health.get("restarts"),
                                         "status": health.get("status"), "queue": health.get("queue"),
                                         "listener_pid": health.get("listener", {}).get("pid")}
        if health.get("listener", {}).get("pid") != self.listener_pid or health.get("restarts"):
            self.notes.append(f"listener changed during the run: restarts={health.get('restarts')}, "
                              f"last_exit={health.get('last_exit')}")
        self._pids = pids
        full, firsts = verify_mplog_full(self.full_path, self.procs, self.n, pids)
        simple = verify_mplog_simple(self.simple_path, self.procs, self.n, firsts)
        total = add_verifications({"full": full, "simplified": simple})
        self._at_flush = (total["lost"], total["dup"], total["torn"])
        return total

    def stop(self, deadline: float) -> None:
        final = self.svc.stop()
        self.extra["health_final"] = {"records": final.get("records"), "restarts": final.get("restarts"),
                                      "last_exit": final.get("last_exit")}
        rec = final.get("records", {})
        if self.spool and os.path.exists(self.spool):
            self.notes.append(f"the spool is still there after stop(): {self.spool} "
                              f"(spool_kept={final.get('spool_kept')!r}, kept_in_spool={rec.get('kept_in_spool')})")
        if not self._pids:  # the run failed before verification: nothing to compare
            self.notes.append(f"mplog final health after the failed run (workers killed): sent={rec.get('sent')} "
                              f"written={rec.get('written')} dropped={rec.get('dropped')} lost={rec.get('lost')}")
            return
        # Once more after stop(): the files must still hold every record exactly once (and the
        # listener's closing notice must be well-formed).
        full, firsts = verify_mplog_full(self.full_path, self.procs, self.n, self._pids)
        simple = verify_mplog_simple(self.simple_path, self.procs, self.n, firsts)
        after = add_verifications({"full": full, "simplified": simple})
        self.extra["verify_after_stop"] = after
        if (after["lost"], after["dup"], after["torn"]) != self._at_flush:
            self.notes.append(f"after stop(): lost/dup/torn {after['lost']}/{after['dup']}/{after['torn']} "
                              f"(at flush: {'/'.join(map(str, self._at_flush))}); "
                              f"full {full['bad_examples']} simplified {simple['bad_examples']}")
        expected = self.procs * (self.n + WARMUP)
        if rec.get("written") != expected or rec.get("dropped") or rec.get("lost"):
            self.notes.append(f"mplog final health: sent={rec.get('sent')} written={rec.get('written')} "
                              f"dropped={rec.get('dropped')} lost={rec.get('lost')} (expected {expected})")


class MplogPythonSetup(MplogSetup):
    """MplogSetup without the compiled code: every ring and handler is opened with
    MPLOG_PURE_PYTHON=1 (the listener and the workers inherit the environment)."""

    def start(self, deadline: float) -> None:
        os.environ["MPLOG_PURE_PYTHON"] = "1"
        super().start(deadline)

    def stop(self, deadline: float) -> None:
        try:
            super().stop(deadline)
        finally:
            os.environ.pop("MPLOG_PURE_PYTHON", None)


class LoguruSetup(Setup):
    writer = "thread"

    def start(self, deadline: float) -> None:
        from loguru import logger
        logger.remove()
        self.logger = logger
        self.hid = logger.add(self.path, format=LOGURU_FMT, level="INFO", enqueue=True, colorize=False,
                              context=self.ctx)

    def worker_arg(self) -> Any:
        return self.logger

    def settle(self, deadline: float) -> None:
        done, _ = call_with_timeout(self.logger.complete, deadline - time.monotonic())
        if not done:
            raise TimeoutError("loguru complete() (after warm-up) did not return")
        time.sleep(0.2)

    def drain(self, deadline: float) -> None:
        done, err = call_with_timeout(self.logger.complete, deadline - time.monotonic())
        if not done:
            raise TimeoutError("loguru complete() did not return before the timeout")
        if isinstance(err, BaseException):
            raise err

    def verify(self, pids: Dict[int, int]) -> Optional[Dict[str, Any]]:
        # loguru's {name} is the caller's module (__main__ / __mp_main__): don't check it.
        return add_verifications({"log": verify_lines(self.path, self.procs, self.n, None)})

    def stop(self, deadline: float) -> None:
        call_with_timeout(lambda: self.logger.remove(self.hid), max(0.1, deadline - time.monotonic()))


class MultiprocessingLogging(Setup):
    writer = "thread"

    def start(self, deadline: float) -> None:
        import multiprocessing_logging
        if multiprocessing.get_start_method(allow_none=True) != "fork":
            multiprocessing.set_start_method("fork", force=True)  # its install() checks the global
        self.handler = _file_handler(self.path)
        _set_root(self.handler)
        multiprocessing_logging.install_mp_handler()
        self.mp_handler = [h for h in logging.getLogger().handlers
                           if isinstance(h, multiprocessing_logging.MultiProcessingHandler)][0]

    def worker_arg(self) -> Any:
        return None

    def drain(self, deadline: float) -> None:
        # Its close() joins the receiver for at most 5 s and then closes the file under it;
        # do what close() does, with our own deadline.
        self.mp_handler._is_closed = True
        self.mp_handler._receive_thread.join(max(0.0, deadline - time.monotonic()))
        if self.mp_handler._receive_thread.is_alive():
            raise TimeoutError("the multiprocessing-logging receiver did not drain before the timeout")
        self.handler.flush()

    def stop(self, deadline: float) -> None:
        _set_root(None)
        self.handler.close()


SETUP_CLASSES = {
    "floor": Floor, "filehandler": FileHandlerSetup, "stdlib-queue": StdlibQueue,
    "stdlib-cookbook": StdlibCookbook, "mplog": MplogSetup, "loguru": LoguruSetup,
    "mplog-python": MplogPythonSetup,
    "concurrent-log-handler": ConcurrentLogHandlerSetup, "multiprocessing-logging": MultiprocessingLogging,
}


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
def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def run_setup(setup: str, procs: int, args: argparse.Namespace) -> Dict[str, Any]:
    # The driver owns the temporary directory, so it is removed even when the coordinator is killed.
    tmp = tempfile.mkdtemp(prefix=f"mplog-bench-{setup}-")
    result_path = os.path.join(tmp, "result.json")
    spec = {"setup": setup, "procs": procs, "records": args.records, "start_method": args.start_method,
            "timeout": args.timeout, "result_path": result_path, "tmp": tmp}
    out = tempfile.TemporaryFile()
    started = time.monotonic()
    popen = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    pgid = popen.pid
    timed_out = False
    try:
        popen.wait(args.timeout + 30)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(pgid, signal.SIGKILL)
        popen.wait()
    except BaseException:
        os.killpg(pgid, signal.SIGKILL)
        popen.wait()
        raise
    leftovers = ""
    # Whatever the coordinator started must be gone (an mplog listener drains and exits by
    # itself when its parent dies; give stragglers a moment, then kill the group).
    for _ in range(50):
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        try:
            import psutil
            names = [f"{p.pid}:{' '.join(p.cmdline()[:3])}" for p in psutil.process_iter()
                     if _safe_pgid(p.pid) == pgid]
        except Exception:
            names = []
        os.killpg(pgid, signal.SIGKILL)
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


def _safe_pgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def skip_reason(setup: str, start_method: str) -> Optional[str]:
    if setup in PEERS:
        import importlib.util
        module, pip_name = PEERS[setup]
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable (pip install {pip_name}, or '.[bench]')"
    if setup == "multiprocessing-logging" and start_method != "fork":
        return "works with the fork start method only"
    return None


def versions() -> Dict[str, str]:
    from importlib import metadata
    out = {}
    for dist in ("mplog", "loguru", "concurrent-log-handler", "multiprocessing-logging", "psutil"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _fmt(value: Any, spec: str = ",.0f", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def row_cells(r: Dict[str, Any]) -> List[str]:
    if not r.get("ok"):
        return [r["setup"], "FAILED", "", "", "", "", "", "", "", ""]
    v = r.get("verify")
    ldt = "n/a" if v is None else f"{v['lost']}/{v['dup']}/{v['torn']}"
    star = "*" if r.get("writer") == "thread" else ""
    return [
        r["setup"],
        _fmt(r["rate"]),
        _fmt(r.get("rate_to_stop")),
        _fmt(r["caller_med_us"], ".2f"),
        _fmt(r["caller_p99_us"], ".2f"),
        _fmt(r["writer_cpu_us"], ".1f") + (star if r["writer_cpu_us"] is not None else ""),
        _fmt(r["worker_cpu_us"], ".1f"),
        _fmt(r["worker_rss_mb"], ".1f") + (f" ({r['worker_shm_mb']:.1f})" if r.get("worker_shm_mb") else ""),
        _fmt(r["writer_rss_mb"], ".1f") + (star if r["writer_rss_mb"] is not None else ""),
        ldt,
    ]


HEADERS = ["setup", "records/s", "records/s to stop()", "call med µs", "call p99 µs", "writer CPU µs/rec", "workers CPU µs/rec",
           "worker RSS MB (shm)", "writer RSS MB", "lost/dup/torn"]


def text_table(rows: List[Dict[str, Any]]) -> str:
    cells = [HEADERS] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = []
    for k, c in enumerate(cells):
        parts = [c[0].ljust(widths[0])] + [c[i].rjust(widths[i]) for i in range(1, len(c))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(row_cells(r)) + " |")
    return "\n".join(lines)


def ratios(rows: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    by = {r["setup"]: r for r in rows if r.get("ok")}
    m = by.get("mplog")
    if m is None:
        return [("mplog", "no result")]
    out = []

    def ratio(a: Optional[float], b: Optional[float]) -> str:
        return "-" if not a or not b else f"{a / b:.2f}x"
    floor, fh = by.get("floor"), by.get("filehandler")
    out.append(("records/s vs floor", ratio(m["rate"], floor and floor["rate"])
                + (f"  ({m['rate']:,.0f} vs {floor['rate']:,.0f})" if floor else "")))
    peers = [by[p] for p in QUEUE_PEERS if p in by]
    if peers:
        best = max(peers, key=lambda r: r["rate"])
        out.append(("records/s vs best queue-based peer",
                    f"{ratio(m['rate'], best['rate'])}  ({best['setup']} {best['rate']:,.0f}/s)"))
    else:
        out.append(("records/s vs best queue-based peer", "-"))
    out.append(("records/s vs filehandler", ratio(m["rate"], fh and fh["rate"])
                + (f"  ({fh['rate']:,.0f}/s)" if fh else "")))
    out.append(("caller median vs filehandler median", ratio(m["caller_med_us"], fh and fh["caller_med_us"])
                + (f"  ({m['caller_med_us']:.2f} vs {fh['caller_med_us']:.2f} µs)" if fh else "")))
    if floor and fh and fh["caller_med_us"] > floor["caller_med_us"]:
        # Issue 14's measure: what the handler adds to Logger.info, against what a synchronous
        # write adds, both above the floor (a NullHandler), medians in the same kind of worker.
        over = (m["caller_med_us"] - floor["caller_med_us"]) / (fh["caller_med_us"] - floor["caller_med_us"])
        out.append(("caller overhead vs filehandler overhead", f"{over:.2f}x  ("
                    f"{m['caller_med_us'] - floor['caller_med_us']:.2f} vs "
                    f"{fh['caller_med_us'] - floor['caller_med_us']:.2f} µs above the floor)"))
    out.append(("caller p99 vs filehandler p99", ratio(m["caller_p99_us"], fh and fh["caller_p99_us"])
                + (f"  ({m['caller_p99_us']:.2f} vs {fh['caller_p99_us']:.2f} µs)" if fh else "")))
    return out


def ratio_values(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """The ratios of issue 14's targets as numbers, for rows measured in the same repeat."""
    by = {r["setup"]: r for r in rows if r.get("ok")}
    m, floor, fh = by.get("mplog"), by.get("floor"), by.get("filehandler")
    out: Dict[str, float] = {}
    if m is None:
        return out
    if floor:
        out["records/s vs floor"] = m["rate"] / floor["rate"]
    peers = [by[p] for p in QUEUE_PEERS if p in by]
    if peers:
        out["records/s vs best queue-based peer"] = m["rate"] / max(r["rate"] for r in peers)
    if fh:
        out["records/s vs filehandler"] = m["rate"] / fh["rate"]
        out["caller p99 vs filehandler p99"] = m["caller_p99_us"] / fh["caller_p99_us"]
        if floor and fh["caller_med_us"] > floor["caller_med_us"]:
            out["caller overhead vs filehandler overhead"] = (
                (m["caller_med_us"] - floor["caller_med_us"]) / (fh["caller_med_us"] - floor["caller_med_us"]))
    return out


def paired_ratios(repeats: List[List[Dict[str, Any]]]) -> List[Tuple[str, str]]:
    """Each ratio within each repeat (its setups ran one after the other, under the same noise),
    then the median over repeats: steadier than ratios of medians picked setup by setup."""
    per = [ratio_values(rows) for rows in repeats]
    out = []
    for key in per[0] if per else []:
        values = sorted(p[key] for p in per if key in p)
        med = values[(len(values) - 1) // 2]
        out.append((key, f"{med:.2f}x  (each repeat: {', '.join(f'{v:.2f}' for v in values)})"))
    return out


def notes_for(r: Dict[str, Any]) -> List[str]:
    out = []
    if not r.get("ok"):
        out.append(f"FAILED: {r.get('error')}")
        tb = r.get("traceback")
        if tb:
            out.extend("    " + line for line in tb.strip().splitlines()[-6:])
    v = r.get("verify")
    if v:
        for fname, part in v["files"].items():
            if part["lost"] or part["dup"] or part["torn"] or part["found"] != part["expected"]:
                out.append(f"{fname}: found {part['found']}/{part['expected']}, lost {part['lost']}, "
                           f"dup {part['dup']}, torn {part['torn']}; examples: {part['bad_examples']}")
            if part.get("notices"):
                out.append(f"{fname}: {part['notices']} mplog notice(s): {part['notice_texts'][:2]}")
    for note in r.get("notes") or []:
        out.append(note)
    hf = (r.get("extra") or {}).get("health_at_flush")
    if hf:
        rec = hf.get("records") or {}
        out.append(f"health after flush: written={rec.get('written')} sent={rec.get('sent')} "
                   f"dropped={rec.get('dropped')} lost={rec.get('lost')} restarts={hf.get('restarts')} "
                   f"status={hf.get('status')}")
        q = hf.get("queue") or {}
        if q.get("capacity_bytes"):
            out.append(f"spool after flush: {q.get('rings')} ring(s) of {q['capacity_bytes'] / 2**20:.1f} MB "
                       f"({q.get('capacity')} records) per process, {(q.get('bytes') or 0) / 2**20:.1f} MB in use")
    for line in r.get("stderr") or []:
        out.append(f"stderr: {line}")
    return out


def pick_median(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["rate"])
    chosen = dict(ok[(len(ok) - 1) // 2])  # the lower middle for an even count: never flatter
    if len(runs) > 1:
        chosen["repeats"] = [round(r["rate"]) if r.get("ok") else None for r in runs]
    return chosen


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000, help="records per worker (default 20000)")
    parser.add_argument("--procs", default="2,8", help="worker counts, comma-separated (default 2,8)")
    parser.add_argument("--start-method", default="fork", choices=["fork", "spawn", "forkserver"])
    parser.add_argument("--only", default="", help="comma-separated setups: " + ",".join(SETUPS + EXTRA_SETUPS))
    parser.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    parser.add_argument("--markdown", metavar="FILE", nargs="?", const="-",
                        help="also write the tables as Markdown (to FILE, or to stdout)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per setup (default 300)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run everything K times, interleaved; show the run with the median records/s "
                             "(the lower middle one for an even K)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0
    procs_list = [int(p) for p in args.procs.split(",") if p.strip()]
    if not procs_list or any(p < 1 for p in procs_list) or args.records < 1 or args.repeat < 1:
        parser.error("--procs, --records and --repeat must be positive")
    setups = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(SETUPS)
    unknown = [s for s in setups if s not in SETUPS + EXTRA_SETUPS]
    if unknown:
        parser.error(f"unknown setup(s): {', '.join(unknown)}; choose from {', '.join(SETUPS + EXTRA_SETUPS)}")

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "start_method": args.start_method,
        "cores": os.cpu_count(), "cores_usable": affinity,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "records_per_worker": args.records, "procs": procs_list,
        "versions": versions(),
        "mplog_source": mplog_source(),
    }
    print(f"mplog benchmark  {header['date']}")
    print(f"Python {header['python']} ({sys.executable})  {header['platform']}")
    print(f"start method {args.start_method}; cores {header['cores']} (usable {affinity}); "
          f"load average {header['loadavg']}")
    print(f"{args.records} records per worker; workers {procs_list}; warm-up {WARMUP} records per worker; "
          f"timeout {args.timeout:.0f} s per setup; repeats {args.repeat}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    print(f"mplog {header['mplog_source']}")
    active = []
    skipped = {}
    for s in setups:
        reason = skip_reason(s, args.start_method)
        if reason:
            skipped[s] = reason
            print(f"skipping {s}: {reason}")
        else:
            active.append(s)
    print("", flush=True)

    runs: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for procs in procs_list:
            for s in active:
                label = f"[{rep + 1}/{args.repeat}] " if args.repeat > 1 else ""
                print(f"{label}running {s} with {procs} workers ...", end=" ", flush=True)
                r = run_setup(s, procs, args)
                runs.setdefault((s, procs), []).append(r)
                if r.get("ok"):
                    v = r.get("verify")
                    ldt = "" if v is None else f", lost/dup/torn {v['lost']}/{v['dup']}/{v['torn']}"
                    print(f"{r['rate']:,.0f} records/s{ldt} ({r['wall_s']:.1f} s)", flush=True)
                else:
                    print(f"FAILED ({r.get('error')})", flush=True)

    timer_ns = sorted(r["timer_ns"] for rs in runs.values() for r in rs if r.get("ok") and "timer_ns" in r)
    tables = []
    md = []
    print()
    print("caller cost: every call timed on its own with perf_counter_ns (timer overhead "
          f"{timer_ns[len(timer_ns) // 2] / 1000 if timer_ns else float('nan'):.3f} µs, included); "
          "median over workers of each worker's median / p99")
    print("writer = the listener process (+ the main process's other threads); * = the writer is a thread "
          "of the main process (CPU: its non-main threads; RSS: the main process)")
    for procs in procs_list:
        rows = [pick_median(runs[(s, procs)]) for s in active if (s, procs) in runs]
        title = f"P={procs} workers x {args.records} records = {procs * args.records} records, {args.start_method}"
        print()
        print(title)
        table = text_table(rows)
        print(table)
        rat = ratios(rows)
        print(f"mplog ratios (P={procs}):")
        for k, v in rat:
            print(f"  {k + ':':38s} {v}")
        notes = [(r["setup"], n) for r in rows for n in notes_for(r)]
        if notes:
            print("notes:")
            for setup, n in notes:
                print(f"  {setup}: {n}")
        ok_rows = [r for r in rows if r.get("ok")]
        noise = ", ".join(f"{r['setup']} {_fmt(r.get('foreign_cpu_share'), '.0%')}" for r in ok_rows)
        if ok_rows:
            print("CPU used by other processes on the machine during each measurement (noise): " + noise)
        paired: List[Tuple[str, str]] = []
        if any(r.get("repeats") for r in rows):
            print("records/s of every repeat: " + "; ".join(f"{r['setup']} {r.get('repeats')}" for r in rows))
            repeats = [[runs[(s, procs)][k] for s in active if (s, procs) in runs and len(runs[(s, procs)]) > k]
                       for k in range(args.repeat)]
            paired = paired_ratios(repeats)
            print(f"mplog ratios within each repeat, median over the {args.repeat} repeats (P={procs}):")
            for k, v in paired:
                print(f"  {k + ':':42s} {v}")
        tables.append({"procs": procs, "rows": rows, "ratios": rat, "paired_ratios": paired})
        md.append(f"**{title}**\n\n{markdown_table(rows)}\n\n" + "\n".join(f"- mplog {k}: {v}" for k, v in (paired or rat))
                  + (f"\n- CPU used by other processes during each measurement: {noise}" if ok_rows else ""))

    if args.markdown:
        text = (f"Python {header['python']}, {args.start_method}, {header['cores']} cores, {header['date'][:10]}, "
                f"mplog {header['mplog_source']}; caller cost = median over workers of per-call median/p99; "
                "* = writer is a thread of the main process.\n\n" + "\n\n".join(md) + "\n")
        if args.markdown == "-":
            print()
            print(text)
        else:
            with open(args.markdown, "w") as f:
                f.write(text)
            print(f"\nMarkdown written to {args.markdown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "skipped": skipped, "tables": tables,
                       "runs": {f"{k[0]}@{k[1]}": v for k, v in runs.items()}}, f, indent=1)
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
