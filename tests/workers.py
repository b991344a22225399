"""Module-level task functions for the pipeline tests (spawn/forkserver pickle them by name)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Tuple

import mplog


def log_n(args: Tuple[str, int]) -> int:
    """Log ``n`` numbered records from this process at INFO; return the pid."""
    tag, n = args
    log = logging.getLogger("t.worker")
    for i in range(n):
        log.info("%s item %d", tag, i)
    return os.getpid()


def log_levels(tag: str) -> int:
    log = logging.getLogger("t.levels")
    log.debug("%s debug", tag)
    log.info("%s info", tag)
    log.warning("%s warning", tag)
    log.log(5, "%s level5", tag)
    log.debug("%s user", tag, extra={"is_user_message": True})
    return os.getpid()


def root_handlers(_: Any) -> Tuple[int, list]:
    root = logging.getLogger()
    return os.getpid(), [type(h).__name__ for h in root.handlers]


def log_exception(tag: str) -> int:
    log = logging.getLogger("t.exc")
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValueError("bad input") from inner
    except ValueError:
        log.exception("%s failed", tag)
    return os.getpid()


def process_target(config: Any, tag: str, n: int) -> None:
    """For plain multiprocessing.Process children."""
    mplog.worker_init(config)
    log_n((tag, n))


def process_target_stderr(config: Any, tag: str, n: int, stderr_path: str) -> None:
    """process_target, with this process's stderr in ``stderr_path`` (see _stderr_to)."""
    _stderr_to(stderr_path)
    process_target(config, tag, n)


def nested_pool(args: Tuple[str, str, int]) -> int:
    """A worker that starts its own pool; the grandchildren log to the same service."""
    import multiprocessing
    method, tag, n = args
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2, **mplog.pool_kwargs()) as pool:
        pool.map(log_n, [(f"{tag}-{k}", n) for k in range(2)])
    return os.getpid()


def threads_with_context(tag: str) -> int:
    log = logging.getLogger("t.ctx")

    def run(k: int) -> None:
        with mplog.context(task=f"{tag}-{k}"):
            log.info("%s thread %d", tag, k)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return os.getpid()


def log_until(config: Any, tag: str, stop: Any, out_dir: str, size: int = 0) -> None:
    """Log numbered records until ``stop`` is set; write the count sent to ``out_dir/tag``."""
    mplog.worker_init(config)
    log = logging.getLogger("t.load")
    pad = "p" * size
    i = 0
    while not stop.is_set():
        for _ in range(50):
            log.info("%s item %d%s", tag, i, pad)
            i += 1
    with open(os.path.join(out_dir, tag), "w") as f:
        f.write(str(i))


def log_big(config: Any, size: int) -> None:
    """Log one record of ``size`` bytes (a worker to be killed in the middle of it)."""
    mplog.worker_init(config)
    logging.getLogger("t.big").info("big %s", "B" * size)


def short_task(i: int) -> int:
    logging.getLogger("t.churn").info("task %d", i)
    return os.getpid()


def log_after_go(config: Any, go: str) -> None:
    """Say ready, wait for the file ``go`` to exist, then log one record and wait to be killed."""
    import time
    mplog.worker_init(config)
    open(go + ".ready", "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)  # polling a file the test creates: the worker's only signal
    logging.getLogger("t.go").info("the one record")
    import signal
    while True:
        signal.pause()  # until the test's SIGKILL


def log_on_command(config: Any, conn: Any, stderr_path: str) -> None:
    """Log one record each time the parent sends a tag; exit on None. Its stderr goes to a
    file (a forkserver child's stderr is the forkserver's, not the test's)."""
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    mplog.worker_init(config)
    log = logging.getLogger("t.cmd")
    while True:
        tag = conn.recv()
        if tag is None:
            return
        log.warning("%s", tag)
        conn.send("done")


# -- helpers for test_spool ------------------------------------------------------------------
def log_counting(args: Tuple[str, str, int]) -> int:
    """Log numbered records forever; every ``every`` records, atomically write to
    ``out_dir/count.<tag>`` how many logging calls have returned. Runs until killed."""
    tag, out_dir, every = args
    log = logging.getLogger("t.count")
    path = os.path.join(out_dir, f"count.{tag}")
    i = 0
    while True:
        log.info("%s item %d", tag, i)
        i += 1
        if i % every == 0:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(str(i))
            os.replace(tmp, path)


def log_until_then_once_more(config: Any, tag: str, stop: Any, out_dir: str, stderr_path: str) -> None:
    """Log numbered records until ``stop`` is set (the test stops the service meanwhile), then
    log one record "<tag> after stop". Writes ``out_dir/<tag>`` as JSON: the calls made in the
    loop, and this process's own slot counters (sent, diverted) just before and after the last
    record. Its stderr goes to ``stderr_path`` (a forkserver child's stderr is not the test's)."""
    import json
    from mplog._app import handler as _worker
    from mplog._common.counters import S_DIVERTED, S_DROPPED, S_SENT

    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    mplog.worker_init(config)
    log = logging.getLogger("t.stop")
    i = 0
    while not stop.is_set():
        for _ in range(20):
            log.info("%s item %d", tag, i)
            i += 1
    slot = _worker._installed.channel._slot  # this process's own counters
    before = {"sent": slot.get(S_SENT), "diverted": slot.get(S_DIVERTED), "dropped": slot.get(S_DROPPED)}
    log.info("%s after stop", tag)
    after = {"sent": slot.get(S_SENT), "diverted": slot.get(S_DIVERTED), "dropped": slot.get(S_DROPPED)}
    with open(os.path.join(out_dir, tag), "w") as f:
        json.dump({"calls": i, "before": before, "after": after}, f)


def log_through_queue(args: Tuple[Any, str, int]) -> int:
    """A task that gets the service's queue as an argument and logs through a QueueHandler."""
    import logging.handlers
    queue, tag, n = args
    log = logging.getLogger("t.queue")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.handlers.QueueHandler(queue)
    log.addHandler(handler)
    try:
        for i in range(n):
            log.info("%s %d", tag, i)
    finally:
        log.removeHandler(handler)
    return os.getpid()


def log_thread_and_age(tag: str) -> Tuple[int, int, float]:
    """Log one record; return this process's pid, thread id and the record's relativeCreated."""
    seen = {}

    class Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen["rel"] = record.relativeCreated
            return True

    log = logging.getLogger("t.ids")
    keep = Keep()
    log.addFilter(keep)
    try:
        log.info("%s", tag)
    finally:
        log.removeFilter(keep)
    return os.getpid(), threading.get_ident(), seen["rel"]


# -- helpers for test_capture (pools made without the initializer) ---------------------------
def log_tagged(tag: str) -> int:
    """Log one INFO record naming ``tag``; return this worker's pid."""
    logging.getLogger("t.capture").info("capture %s", tag)
    return os.getpid()


def shutdown_loky() -> None:
    """Stop this process's reusable loky executor (joblib's too), if one runs, and its workers."""
    import sys
    for name in ("joblib.externals.loky.reusable_executor", "loky.reusable_executor"):
        module = sys.modules.get(name)
        executor = getattr(module, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)


def nested_joblib(tag: str) -> list:
    """Inside a loky worker, a loky Parallel of its own, made without the initializer."""
    import joblib
    try:
        return joblib.Parallel(n_jobs=2, backend="loky")(
            joblib.delayed(log_tagged)(f"{tag}-{i}") for i in range(4))
    finally:
        shutdown_loky()  # its workers must not outlive this one


def nested_executor(args: Tuple[str, str]) -> list:
    """Inside a worker, a ProcessPoolExecutor of ``method``, made without the initializer."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    method, tag = args
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as pool:
        return list(pool.map(log_tagged, [f"{tag}-{i}" for i in range(4)]))


def log_past_the_service(tag: str) -> Tuple[int, list, list]:
    """Log one WARNING with ``logging.lastResort`` replaced by a recorder: returns the pid, the
    messages that reached lastResort (where logging sends a record no handler takes), and the
    root's handler class names."""
    seen: list = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    saved = logging.lastResort
    logging.lastResort = Recorder(logging.WARNING)
    try:
        logging.getLogger("t.capture").warning("capture %s", tag)
    finally:
        logging.lastResort = saved
    return os.getpid(), seen, [type(h).__name__ for h in logging.getLogger().handlers]


def child_state(_: Any) -> Tuple[int, list, Any, Any]:
    """This process's pid, root handler class names, MPLOG_CAPTURE and the chained marker."""
    return (os.getpid(), [type(h).__name__ for h in logging.getLogger().handlers],
            os.environ.get("MPLOG_CAPTURE"), os.environ.get("MPLOG_TEST_CHAINED"))


# -- helpers for test_deaths ---------------------------------------------------------------------
def _stderr_to(path: str) -> None:
    """This process's stderr, fd 2 and sys.stderr, becomes ``path`` (a forkserver child's is
    the forkserver's; a fork child's sys.stderr is pytest's capture)."""
    import sys
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def crash(kind: str) -> int:
    """Log one record naming ``kind``, then end this process that way (a real crash, not a
    simulation: the kernel delivers the signal, or C code faults)."""
    import ctypes
    import signal
    logging.getLogger("t.crash").info("about to %s", kind)
    if kind == "sigkill":  # as the OOM killer sends it
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit3":
        os._exit(3)
    elif kind == "segv":  # C code reads address 0
        ctypes.string_at(0)
    elif kind == "abort":  # C code calls abort()
        os.abort()
    elif kind == "libc_fatal":  # glibc prints a message to fd 2 and aborts, holding the GIL
        ctypes.PyDLL(None).__libc_fatal(b"libfoo: fatal: corrupted heap\n")
    elif kind in ("sigbus", "sigfpe"):
        threading.Thread(target=signal.pause, name="idle-helper", daemon=True).start()  # a second stack
        os.kill(os.getpid(), getattr(signal, kind.upper()))
    return os.getpid()


def crash_target(config: Any, kind: str, stderr_path: str) -> None:
    """A plain Process target: its stderr goes to a file (a forkserver child's stderr is the
    forkserver's), then it logs and ends by ``kind``: "raise" (an uncaught exception), "exit3"
    (sys.exit(3)), "ok" (returns), or a crash()."""
    import sys
    _stderr_to(stderr_path)
    mplog.worker_init(config)
    logging.getLogger("t.target").info("target %s", kind)
    if kind == "raise":
        raise KeyError("uncaught in the target")
    if kind == "exit3":
        sys.exit(3)
    if kind != "ok":
        crash(kind)


def nested_crash(config: Any, method: str) -> None:
    """A Process that starts a Pool of one; its grandchild is SIGKILLed in a task. Waits for
    the pool to replace it, then terminates the pool (the lost task's result never comes, so a
    close() and join() would wait for it forever)."""
    import multiprocessing
    mplog.worker_init(config)
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(1, **mplog.pool_kwargs()) as pool:
        first = pool.apply(os.getpid)
        pool.apply_async(crash, ("sigkill",))
        while pool.apply(os.getpid) == first:  # the replacement answers: the first one is gone
            pass


def thread_raises(stderr_path: str) -> int:
    """A pool task whose thread dies of an uncaught exception; the task itself returns."""
    _stderr_to(stderr_path)

    def boom() -> None:
        raise RuntimeError("boom in a thread")

    t = threading.Thread(target=boom, name="boomer")
    t.start()
    t.join(30)
    return os.getpid()


def raises_to_the_caller(tag: str) -> None:
    raise ValueError(f"{tag}: returned through the future")


def chatty(tag: str) -> int:
    """Write to stdout and stderr every way a worker does: print(), sys.stderr, the raw fd, a
    child program, C's printf; and a last line without its newline."""
    import ctypes
    import subprocess
    import sys
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            real = getattr(sys, name).fileno() == fd
        except Exception:
            real = False
        if not real:  # a forked child of pytest inherits its capture objects, not fd 1 and 2
            setattr(sys, name, open(fd, "w", buffering=1, closefd=False))
    print(f"{tag} print line")
    sys.stderr.write(f"{tag} stderr line\n")
    os.write(1, f"{tag} fd-1 line\n".encode())
    subprocess.run(["sh", "-c", f"echo {tag} child program line"], check=True)
    libc = ctypes.CDLL(None)
    libc.printf(f"{tag} C printf line\n".encode())
    libc.fflush(None)
    print(f"{tag} partial line", end="")
    return os.getpid()


def join_cgroup_then_exhaust_memory(config: Any, cgroup_procs: str) -> None:
    """Move into a memory-limited cgroup (before claiming a slot, so the listener reads that
    cgroup's oom_kill count), log, then allocate until the OOM killer ends this process."""
    with open(cgroup_procs, "w") as f:
        f.write(str(os.getpid()))
    mplog.worker_init(config)
    logging.getLogger("t.oom").info("allocating until the OOM killer comes")
    hog = []
    while True:
        hog.append(b"x" * (16 << 20))  # written, so every page is really used



class _NotText(logging.Filter):
    """A filter that sets exc_text and stack_info to what no formatter takes (bytes, a number)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_text = b"Traceback: boom"  # type: ignore[assignment]
        record.stack_info = 7  # type: ignore[assignment]
        return True


def log_not_text(config: Any, tag: str) -> None:
    """One record whose exc_text and stack_info are not text, then a plain one."""
    mplog.worker_init(config)
    bad = logging.getLogger("t.nottext")
    bad.addFilter(_NotText())
    bad.error("%s poisoned", tag)
    logging.getLogger("t.plain").info("%s after", tag)


def modules_loaded(names: tuple) -> list:
    """Log one record, then say which of ``names`` this process has imported."""
    import sys
    logging.getLogger("t.modules").info("modules from %d", os.getpid())
    return sorted(set(names) & set(sys.modules))


def hold_until(config: Any, ready: Any, stay: Any) -> None:
    """Log one record, say ready, then live on until ``stay`` is set (an orphaned worker)."""
    mplog.worker_init(config)
    logging.getLogger("t.hold").info("holding")
    ready.set()
    stay.wait(120)


def big_sender(config: Any, n: int, size: int, go: Any, sent: Any) -> None:
    """Log ``n`` records of ``size`` bytes once ``go`` is set, set ``sent``, then wait to be
    killed (the fairness tests SIGKILL it with its records still in its ring)."""
    import time
    mplog.worker_init(config)
    go.wait(60)
    log = logging.getLogger("t.big")
    for i in range(n):
        log.info("big %d %s", i, "x" * size)
    sent.set()
    time.sleep(120)  # the test SIGKILLs it here, with its big records still in its ring


def small_sender(config: Any, tag: str, n: int, go: Any) -> None:
    """Log ``n`` numbered small records once ``go`` is set, then return."""
    mplog.worker_init(config)
    go.wait(60)
    log_n((tag, n))
