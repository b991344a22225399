"""The spool (issue 10), end to end with real processes: honest per-process capacity, stalls that
cost callers nothing, overflow policies under a long stall, exactly-once delivery across listener
SIGKILLs, signals to the whole process group, stop() while workers log, recovery of a killed
run's spool, and no spool left behind.

A stalled disk is stood in for by SIGSTOP of the listener (``health()["listener"]["pid"]``), and
every wait is a deadline loop on an observable condition (``wait_for``), a flush barrier, an
Event or a process exit. Every record is checked: ``sent = written + dropped + diverted + lost``
holds with the records actually found in the files (and on stderr).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import psutil
import pytest

import mplog
from mplog._common import compiled as _compiled
from mplog._common.spool import ring_capacity, spool_prefix, spool_root
from conftest import app_blocks, read_blocks, wait_for

import workers

HERE = Path(__file__).parent
SUMMARY = re.compile(r"mplog stopped: (\d+) records written, (\d+) dropped, (\d+) lost(?:, (\d+) sent to stderr)?")


# -- helpers -----------------------------------------------------------------------------------
def _listener_pid(svc: mplog.LogService) -> int:
    return svc.health()["listener"]["pid"]


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


class _Stall:
    """SIGSTOP the listener (a disk that does not answer) until ``resume()``; always resumed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.resumed = False
        os.kill(pid, signal.SIGSTOP)
        # kill() returns before a process running on another CPU has stopped: wait until it has.
        wait_for(lambda: _stopped(pid), timeout=10, what=f"listener {pid} to stop")

    def resume(self) -> None:
        if not self.resumed:
            self.resumed = True
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:  # killed meanwhile (with its whole group)
                pass

    def __enter__(self) -> "_Stall":
        return self

    def __exit__(self, *exc: object) -> None:
        self.resume()


def _identity(records: Dict[str, int]) -> None:
    assert records["sent"] == records["written"] + records["dropped"] + records["diverted"] + records["lost"], records


def _messages(path: Path) -> List[str]:
    return [b["message"] for b in app_blocks(path)]  # type: ignore[misc]


def _numbered(messages: List[str], tag: str) -> List[int]:
    """The numbers of ``<tag> item <n>`` records, in file order."""
    pat = re.compile(rf"^{re.escape(tag)} item (\d+)$")
    return [int(m.group(1)) for m in map(pat.match, messages) if m]


def _assert_prefix_once(numbers: List[int], at_least: int, what: str) -> int:
    """``numbers`` is 0, 1, ..., m-1 exactly (every record once, in order, no gap), m >= at_least."""
    dupes = [n for n, c in Counter(numbers).items() if c > 1]
    assert not dupes, f"{what}: {len(dupes)} records written more than once, e.g. {dupes[:5]}"
    missing = sorted(set(range(at_least)) - set(numbers))
    assert not missing, f"{what}: {len(missing)} returned records missing from the log, e.g. {missing[:5]}"
    assert numbers == list(range(len(numbers))), f"{what}: records out of order or with a gap"
    return len(numbers)


def _summary(run_log: Path) -> Dict[str, int]:
    found = SUMMARY.findall(run_log.read_text(encoding="utf-8"))
    assert len(found) == 1, f"expected one stop summary in {run_log}, found {found}"
    w, d, lost, x = found[0]
    return {"written": int(w), "dropped": int(d), "lost": int(lost), "diverted": int(x or 0)}


def _leftover_spools(logdir: Path, name: str = "run", root: Optional[str] = None) -> List[str]:
    prefix = spool_prefix(str(logdir), name)
    root = root or spool_root()
    return sorted(e for e in os.listdir(root) if e.startswith(prefix))


def _script(tmp_path: Path, body: str, name: str = "app.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _group(pgid: int) -> List[psutil.Process]:
    """The live (non-zombie) processes of process group ``pgid``."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    try:
        wait_for(lambda: not _group(pgid), timeout=timeout, what=f"every process of group {pgid} to exit")
    except AssertionError:
        left = [(p.pid, p.name()) for p in _group(pgid)]
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        raise AssertionError(f"processes of group {pgid} still running: {left}")


def _kill_everything(pgid: int, listener_pid: int) -> None:
    """SIGKILL of the application's group and of its listener (a session of its own): what an
    OOM kill of the whole cgroup, or systemd's final SIGKILL, does."""
    listener = psutil.Process(listener_pid)
    os.killpg(pgid, signal.SIGKILL)
    listener.kill()
    _wait_group_gone(pgid)
    listener.wait(10)


def _read_tagged(stdout, tag: str, timeout: float = 60.0) -> List[str]:
    """Read the child's stdout up to a line starting with ``tag`` (bounded by a watchdog)."""
    found: List[List[str]] = []

    def read() -> None:
        for line in stdout:
            if line.startswith(tag):
                found.append(line.split()[1:])
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert found, f"the child did not print {tag} within {timeout} s (or exited)"
    return found[0]


def _named_semaphores() -> Set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}
    except OSError:
        return set()


def _mapped_semaphores() -> Set[str]:
    """The multiprocessing semaphores some live process still maps."""
    used: Set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                used.update(line.rsplit("/", 1)[1].strip() for line in f if "/dev/shm/sem.mp-" in line)
        except OSError:
            pass
    return used


@pytest.fixture
def child(tmp_path: Path) -> Iterator:
    """``child(script, *args, env=...)``: a Popen in its own session (its own process group);
    whatever is left of the group is SIGKILLed after the test."""
    started: List[subprocess.Popen] = []
    semaphores = _named_semaphores()

    def run(script: Path, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        with open(tmp_path / f"child-{len(started)}.stderr", "w") as err:
            p = subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=err, text=True, env=env or _env(), start_new_session=True)
        started.append(p)
        return p

    yield run
    for p in started:
        try:  # its listener too: a session of its own, out of the group's reach
            left = psutil.Process(p.pid).children(recursive=True)
        except psutil.Error:
            left = []
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        for q in left:
            try:
                q.kill()
            except psutil.Error:
                pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
    # A spawn or forkserver pool's semaphores are unlinked by its resource tracker, which a
    # SIGKILL of the group takes too: remove what the killed applications left in /dev/shm.
    for name in _named_semaphores() - semaphores - _mapped_semaphores():
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


# -- 1. capacity -------------------------------------------------------------------------------
def test_capacity_is_exactly_queue_size_records_per_process(service):
    """With queue_size=N and the listener stalled, one process logs exactly N records without a
    drop and the N+1th is dropped (overflow="drop"); health() reports the capacity in records and
    in bytes; once the listener resumes, all N (and not the dropped one) are in the file."""
    n = 2000
    svc = service(overflow="drop", queue_size=n)
    q = svc.health()["queue"]
    assert q["capacity"] == n
    assert q["capacity_bytes"] == ring_capacity(n)
    assert q["capacity_bytes"] >= n * 256  # room for N records of ordinary size
    log = logging.getLogger("cap")
    with _Stall(_listener_pid(svc)) as stall:
        for i in range(n):
            log.info("cap item %d: a record of ordinary size, with a few words of text in it", i)
        r = svc.health()["records"]
        assert (r["sent"], r["dropped"], r["written"]) == (n, 0, 0)
        log.info("cap item %d: a record of ordinary size, with a few words of text in it", n)
        r = svc.health()["records"]
        assert (r["sent"], r["dropped"], r["written"]) == (n + 1, 1, 0)
        stall.resume()
    assert svc.flush(30)
    msgs = _messages(svc.full_path)
    assert _numbered([m.split(":")[0] for m in msgs], "cap") == list(range(n))
    r = svc.health()["records"]
    assert (r["written"], r["dropped"], r["lost"], r["diverted"]) == (n, 1, 0, 0)
    _identity(r)
    final = svc.stop()["records"]
    _identity(final)
    assert (final["sent"], final["written"], final["dropped"]) == (n + 1, n, 1)


# -- 2. a stall costs callers nothing ------------------------------------------------------------
def test_stalled_listener_costs_callers_nothing(service):
    """8,000 records logged from the main process while the listener is stopped (default
    queue_size 10000): no single call waits (the old pipe blocked for ~3 s); after SIGCONT all
    8,000 are in the file, once each, in order."""
    count = 8000
    svc = service()
    assert svc.health()["queue"]["capacity"] == 10000
    log = logging.getLogger("stall")
    worst = 0.0
    clock = time.perf_counter
    with _Stall(_listener_pid(svc)) as stall:
        t_all = clock()
        for i in range(count):
            t0 = clock()
            log.info("stall item %d", i)
            worst = max(worst, clock() - t0)
        elapsed = clock() - t_all
        r = svc.health()["records"]
        assert (r["sent"], r["written"], r["dropped"], r["diverted"]) == (count, 0, 0, 0)
        stall.resume()
    assert worst < 0.5, f"a logging call took {worst:.3f} s while the listener was stalled"
    assert elapsed < 10.0, f"{count} calls took {elapsed:.1f} s"
    assert svc.flush(30)
    assert _numbered(_messages(svc.full_path), "stall") == list(range(count))
    final = svc.stop()["records"]
    _identity(final)
    assert (final["sent"], final["written"], final["dropped"], final["lost"], final["diverted"]) == (count, count, 0, 0, 0)


# -- 3. overflow under a long stall --------------------------------------------------------------
def test_timeout_policy_waits_once_per_episode(service):
    """overflow="timeout" (10 ms), queue_size=1000, listener stopped: 20,000 calls finish in far
    less than 19,000 x 10 ms (the old code took 173 s): one wait, then drops without waiting;
    exactly 19,000 dropped; after SIGCONT the first 1,000 are in the file."""
    total, size = 20000, 1000
    svc = service(overflow="timeout", overflow_timeout=0.01, queue_size=size)
    log = logging.getLogger("tmo")
    with _Stall(_listener_pid(svc)) as stall:
        t0 = time.perf_counter()
        for i in range(total):
            log.info("tmo item %d", i)
        elapsed = time.perf_counter() - t0
        r = svc.health()["records"]
        assert (r["sent"], r["dropped"], r["written"]) == (total, total - size, 0)
        stall.resume()
    assert elapsed < 5.0, f"{total} calls took {elapsed:.1f} s under overflow='timeout'"
    assert svc.flush(30)
    assert _numbered(_messages(svc.full_path), "tmo") == list(range(size))
    final = svc.stop()["records"]
    _identity(final)
    assert (final["written"], final["dropped"], final["lost"], final["diverted"]) == (size, total - size, 0, 0)


def test_drop_policy_never_waits(service):
    """overflow="drop", queue_size=1000, listener stopped: no call waits, exactly the records
    beyond the ring's 1,000 are dropped, and the 1,000 are written after SIGCONT."""
    total, size = 20000, 1000
    svc = service(overflow="drop", queue_size=size)
    log = logging.getLogger("drp")
    worst = 0.0
    clock = time.perf_counter
    with _Stall(_listener_pid(svc)) as stall:
        t_all = clock()
        for i in range(total):
            t0 = clock()
            log.info("drp item %d", i)
            worst = max(worst, clock() - t0)
        elapsed = clock() - t_all
        r = svc.health()["records"]
        assert (r["sent"], r["dropped"]) == (total, total - size)
        stall.resume()
    assert worst < 0.5, f"a call waited {worst:.3f} s under overflow='drop'"
    assert elapsed < 5.0
    assert svc.flush(30)
    assert _numbered(_messages(svc.full_path), "drp") == list(range(size))
    final = svc.stop()["records"]
    _identity(final)
    assert (final["written"], final["dropped"], final["lost"]) == (size, total - size, 0)


def test_block_policy_waits_for_room_and_loses_nothing(service):
    """overflow="block", queue_size=1000, listener stopped: the 1,001st call blocks while the
    ring is full and returns only after SIGCONT; then every record is written, once, in order."""
    total, size = 3000, 1000
    svc = service(overflow="block", queue_size=size)
    log = logging.getLogger("blk")
    progress = {"calls": 0, "entered": 0.0, "returned_1001": 0.0}
    done = threading.Event()

    def produce() -> None:
        for i in range(total):
            if i == size:
                progress["entered"] = time.monotonic()
            log.info("blk item %d", i)
            if i == size:
                progress["returned_1001"] = time.monotonic()
            progress["calls"] = i + 1
        done.set()

    stall = _Stall(_listener_pid(svc))
    t = threading.Thread(target=produce)
    try:
        t.start()
        wait_for(lambda: progress["entered"], timeout=30, what="the producer to reach the 1,001st call")
        # It stays inside that call while the ring is full: still there 0.3 s later.
        wait_for(lambda: time.monotonic() - progress["entered"] >= 0.3, what="0.3 s of the stall")
        assert progress["calls"] == size and not progress["returned_1001"], "the call did not block on a full ring"
        r = svc.health()["records"]
        assert (r["sent"], r["dropped"]) == (size, 0)
        resumed = time.monotonic()
        stall.resume()
        t.join(60)
    finally:
        stall.resume()
        t.join(60)
    assert done.is_set()
    assert progress["returned_1001"] >= resumed
    assert svc.flush(30)
    assert _numbered(_messages(svc.full_path), "blk") == list(range(total))
    final = svc.stop()["records"]
    _identity(final)
    assert (final["sent"], final["written"], final["dropped"], final["lost"]) == (total, total, 0, 0)


# -- 4. exactly once across listener kills -------------------------------------------------------
def test_exactly_once_across_ten_listener_kills(service, ctx, capfd):
    """Two worker processes log 40,000 records each while the listener is SIGKILLed 10 times,
    each time in the middle of its work: every record is in the full log exactly once (in each
    process's order), nothing lost or diverted, 10 restarts, each at once (no backoff)."""
    per_worker, kills = 40000, 10
    # A small ring keeps the workers paced by the listener, so the kills land while they log.
    svc = service(queue_size=1000)
    procs = [ctx.Process(target=workers.process_target, args=(svc.worker_config, tag, per_worker))
             for tag in ("kA", "kB")]
    for p in procs:
        p.start()
    logging_now = 0  # kills that landed while both workers were still logging
    try:
        for k in range(kills):
            # Kill a listener that is doing its work: it has written since it started (or there
            # is nothing left to write; either way it was running normally).
            written = svc.health()["records"]["written"]
            wait_for(lambda: svc.health()["records"]["written"] > written or not any(p.is_alive() for p in procs),
                     timeout=20, what=f"the listener to write (kill {k + 1})")
            old = _listener_pid(svc)
            logging_now += all(p.is_alive() for p in procs)
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: (lambda h: h["listener"]["alive"] and h["listener"]["pid"] not in (None, old))(svc.health()),
                     timeout=15, what=f"a restarted listener after kill {k + 1}")
        h = svc.health()
        assert h["restarts"] == kills
        for p in procs:
            p.join(120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    assert [p.exitcode for p in procs] == [0, 0]
    assert logging_now >= kills // 2, f"only {logging_now} of the kills came while the workers logged"
    assert svc.flush(60)
    msgs = _messages(svc.full_path)
    for tag in ("kA", "kB"):
        assert _assert_prefix_once(_numbered(msgs, tag), per_worker, tag) == per_worker
    r = svc.health()["records"]
    assert (r["written"], r["lost"], r["diverted"], r["dropped"]) == (2 * per_worker, 0, 0, 0)
    _identity(r)
    final = svc.stop()
    fr = final["records"]
    _identity(fr)
    assert (fr["sent"], fr["written"], fr["lost"], fr["diverted"]) == (2 * per_worker, 2 * per_worker, 0, 0)
    assert final["restarts"] == kills
    notices = [b["message"] for b in read_blocks(svc.full_path) if b["logger"] == "mplog"]
    assert notices.count("listener restarted after SIGKILL(-9); 0 records lost") == kills
    err = capfd.readouterr().err
    assert err.count("listener exited with SIGKILL(-9); restarting now") == kills
    assert "restarting in" not in err


# -- 5. signals to the process group -------------------------------------------------------------
GROUP_APP = """
import logging, multiprocessing, os, sys
import mplog, workers

if __name__ == "__main__":
    method, logdir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    svc = mplog.LogService(logdir, shutdown_timeout=5.0)
    svc.start()
    log = logging.getLogger("app")
    for i in range(100):
        log.info("main item %d", i)
    assert svc.flush(10)
    with multiprocessing.get_context(method).Pool(2, **svc.pool_kwargs()) as pool:
        pool.map_async(workers.log_counting, [("g%d" % k, out, 250) for k in range(2)])
        print("READY", svc.health()["queue"]["spool"], svc.health()["listener"]["pid"], flush=True)
        sys.stdin.read()  # until the signal
"""


def test_sigterm_to_the_group_writes_every_returned_record_and_removes_the_spool(tmp_path, ctx, child):
    """SIGTERM to the application's whole process group (timeout(1), SLURM, systemd) while pool
    workers log: every process of the group exits, every record whose logging call had returned
    is in the full log exactly once (and nothing out of order), the stop summary balances, and
    the spool directory is gone."""
    logs, out = tmp_path / "logs", tmp_path / "out"
    out.mkdir()
    p = child(_script(tmp_path, GROUP_APP), ctx.get_start_method(), str(logs), str(out))
    spool, listener_pid = _read_tagged(p.stdout, "READY")
    assert os.path.isdir(spool) and os.path.basename(spool).startswith(spool_prefix(str(logs), "run"))
    listener = psutil.Process(int(listener_pid))
    # A session of its own: the group's signal does not reach it; it sees its parent go.
    assert os.getsid(listener.pid) == listener.pid and os.getpgid(listener.pid) != p.pid
    wait_for(lambda: all((out / f"count.g{k}").exists() and int((out / f"count.g{k}").read_text()) >= 2000
                         for k in range(2)), timeout=60, what="both workers to log 2,000 records")
    os.killpg(p.pid, signal.SIGTERM)
    _wait_group_gone(p.pid)
    listener.wait(30)  # then goes itself (psutil.TimeoutExpired if it lingers)
    assert p.wait(5) == -signal.SIGTERM
    returned = {f"g{k}": int((out / f"count.g{k}").read_text()) for k in range(2)}
    msgs = _messages(logs / "run.debug.log")
    assert _numbered(msgs, "main") == list(range(100))
    found = {tag: _assert_prefix_once(_numbered(msgs, tag), n, tag) for tag, n in returned.items()}
    assert not os.path.exists(spool), "the spool directory outlived its run"
    assert _leftover_spools(logs) == []
    text = (logs / "run.log").read_text(encoding="utf-8")
    m = re.search(r"mplog stopped \(application gone\): (\d+) records written, (\d+) dropped, (\d+) lost", text)
    assert m, text[-2000:]
    written, dropped, lost = map(int, m.groups())
    assert written == 100 + sum(found.values()) == len(msgs)
    assert (dropped, lost) == (0, 0)


KILLED_GROUP_APP = """
import logging, multiprocessing, os, sys
import mplog, workers

if __name__ == "__main__":
    method, logdir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    svc = mplog.LogService(logdir, shutdown_timeout=5.0)
    svc.start()
    print("LISTENER", svc.health()["listener"]["pid"], svc.health()["queue"]["spool"], os.getpid(), flush=True)
    sys.stdin.readline()  # the test stalls the listener, then says go
    with multiprocessing.get_context(method).Pool(2, **svc.pool_kwargs()) as pool:
        pool.map(workers.log_n, [("r%d" % k, n) for k in range(2)])
        for i in range(n):
            logging.getLogger("app").info("main item %d", i)
        print("LOGGED", flush=True)
        sys.stdin.read()  # until the SIGKILL
"""


def test_sigkill_of_the_group_keeps_the_spool_and_the_next_run_recovers_it(tmp_path, ctx, child, service):
    """SIGKILL of the whole group while the (stalled) listener had written nothing: the spool
    stays with every record in it; the next LogService on the same directory and name writes them
    first, exactly once, says "recovered N records from a previous run (pid P)", reports them in
    health()["records"]["recovered"], and removes the old spool."""
    n = 1500
    logs = tmp_path / "logs"
    p = child(_script(tmp_path, KILLED_GROUP_APP), ctx.get_start_method(), str(logs), str(n))
    listener, spool, main_pid = _read_tagged(p.stdout, "LISTENER")
    listener_pid = int(listener)
    with _Stall(listener_pid):
        p.stdin.write("go\n")
        p.stdin.flush()
        _read_tagged(p.stdout, "LOGGED")
        _kill_everything(p.pid, listener_pid)  # the stalled listener dies too
    assert p.wait(5) == -signal.SIGKILL
    assert os.path.isdir(spool), "a killed run's spool must stay for the next run"
    assert _messages(logs / "run.debug.log") == []  # nothing was written before the kill
    total = 3 * n

    svc = service()  # tmp_path/"logs", name "run": the same file set
    h = svc.health()
    assert h["records"]["recovered"] == total
    assert not os.path.exists(spool), "the recovered spool must be removed"
    assert _leftover_spools(logs) == [os.path.basename(h["queue"]["spool"])]
    logging.getLogger("app").info("new run")
    assert svc.flush(30)
    msgs = _messages(logs / "run.debug.log")
    for tag in ("r0", "r1", "main"):
        assert _numbered(msgs, tag) == list(range(n)), tag
    assert msgs[-1] == "new run" and len(msgs) == total + 1
    notices = [b["message"] for b in read_blocks(logs / "run.debug.log") if b["logger"] == "mplog"]
    assert f"recovered {total} records from a previous run (pid {main_pid})" in notices
    final = svc.stop()
    _identity(final["records"])
    assert (final["records"]["sent"], final["records"]["written"]) == (1, 1)  # this run's own
    assert final["records"]["recovered"] == total
    assert _leftover_spools(logs) == []


GROUP_KILLED_APP = """
import logging, multiprocessing, os, sys
import mplog, workers

if __name__ == "__main__":
    method, logdir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    svc = mplog.LogService(logdir, shutdown_timeout=5.0)
    svc.start()
    with multiprocessing.get_context(method).Pool(2, **svc.pool_kwargs()) as pool:
        pool.map(workers.log_n, [("r%d" % k, n) for k in range(2)])
        for i in range(n):
            logging.getLogger("app").info("main item %d", i)
        print("LOGGED", svc.health()["listener"]["pid"], svc.health()["queue"]["spool"], flush=True)
        sys.stdin.read()  # until the SIGKILL
"""


def test_sigkill_of_the_group_loses_nothing_the_listener_writes_it_and_goes(tmp_path, ctx, child):
    """SIGKILL of the application's process group (``kill -KILL -- -PGID``, ``timeout -s KILL``)
    after its processes logged: the listener, in a session of its own, is not killed with them.
    It writes every record the spool holds, once each, names the pool workers' deaths, removes
    the spool and exits by itself."""
    n = 1500
    logs = tmp_path / "logs"
    p = child(_script(tmp_path, GROUP_KILLED_APP), ctx.get_start_method(), str(logs), str(n))
    listener_pid, spool = _read_tagged(p.stdout, "LOGGED")
    listener = psutil.Process(int(listener_pid))
    os.killpg(p.pid, signal.SIGKILL)
    _wait_group_gone(p.pid)
    assert p.wait(5) == -signal.SIGKILL
    listener.wait(30)  # psutil.TimeoutExpired if it lingers
    msgs = _messages(logs / "run.debug.log")
    for tag in ("r0", "r1", "main"):
        assert _numbered(msgs, tag) == list(range(n)), tag
    assert not os.path.exists(spool), "the spool directory outlived its run"
    assert _leftover_spools(logs) == []
    # Each pool worker that logged (one may have run both tasks) has its death said.
    logged = {b["pid"] for b in read_blocks(logs / "run.debug.log") if re.match(r"r\d item ", str(b["message"]))}
    text = (logs / "run.log").read_text(encoding="utf-8")
    killed = {int(pid) for pid in re.findall(r"\(pid (\d+)\) was killed by SIGKILL", text)}
    assert logged and logged <= killed, (logged, killed, text[-3000:])
    m = re.search(r"mplog stopped \(application gone\): (\d+) records written, (\d+) dropped, (\d+) lost", text)
    assert m, text[-2000:]
    assert tuple(map(int, m.groups()))[1:] == (0, 0)


# -- 6. stop() while workers still log ------------------------------------------------------------
def test_stop_while_a_worker_logs(service, ctx, tmp_path):
    """stop() while a worker process logs in a loop: the stop summary in run.log is the final
    report; sent = written + dropped + diverted + lost; each of the worker's records is either
    in the file (a prefix, once each) or on its stderr (the rest); a record logged after the stop
    goes to stderr and is counted as diverted in the worker's own counters."""
    svc = service(shutdown_timeout=5.0)
    out = tmp_path / "out"
    out.mkdir()
    err_path = tmp_path / "worker.stderr"
    stop = ctx.Event()
    w = ctx.Process(target=workers.log_until_then_once_more,
                    args=(svc.worker_config, "sw", stop, str(out), str(err_path)))
    w.start()
    try:
        wait_for(lambda: svc.health()["records"]["written"] >= 2000, timeout=30, what="the worker to log")
        final = svc.stop()
        stop.set()
        w.join(30)
    finally:
        stop.set()
        if w.is_alive():
            w.kill()
        w.join(10)
    assert w.exitcode == 0
    r = final["records"]
    _identity(r)
    assert _summary(svc.simplified_path) == {k: r[k] for k in ("written", "dropped", "lost", "diverted")}
    assert r["lost"] == 0 and r["dropped"] == 0

    result = json.loads((out / "sw").read_text())
    calls = result["calls"]
    in_file = _numbered(_messages(svc.full_path), "sw")
    n_file = _assert_prefix_once(in_file, 0, "sw in the file")
    assert n_file == r["written"]
    err = err_path.read_text(encoding="utf-8", errors="replace")
    on_stderr = [int(x) for x in re.findall(r"^\[[^\]]*\] sw item (\d+)$", err, re.M)]
    assert on_stderr == list(range(n_file, calls)), "each record is in the file or on stderr, once"
    assert calls == n_file + len(on_stderr)
    # The worker's own slot: the loop's records are sent, the diverted ones the ones on stderr;
    # the record after the stop is one more sent, one more diverted, and on stderr.
    before, after = result["before"], result["after"]
    assert before["sent"] == calls and before["dropped"] == 0
    assert before["diverted"] == len(on_stderr)
    assert (after["sent"], after["diverted"]) == (before["sent"] + 1, before["diverted"] + 1)
    assert re.search(r"^\[[^\]]*\] sw after stop$", err, re.M)
    # The final report counted what the listener saw by its summary: every record up to then.
    assert r["written"] + r["diverted"] <= calls


# -- 7. nothing left behind ----------------------------------------------------------------------
def test_normal_stop_leaves_no_spool(service, tmp_path):
    """After a normal stop, no spool directory of the file set remains in the spool root."""
    svc = service()
    spool = svc.health()["queue"]["spool"]
    assert os.path.isdir(spool) and os.path.dirname(spool) == spool_root()
    for i in range(500):
        logging.getLogger("n").info("n item %d", i)
    final = svc.stop()["records"]
    _identity(final)
    assert final["written"] == 500
    assert not os.path.exists(spool)
    assert _leftover_spools(tmp_path / "logs") == []


KILLED_MAIN_APP = """
import logging, sys
import mplog

if __name__ == "__main__":
    svc = mplog.LogService(sys.argv[1], shutdown_timeout=5.0)
    svc.start()
    for i in range(3000):
        logging.getLogger("app").info("km item %d", i)
    print("READY", svc.health()["listener"]["pid"], svc.health()["queue"]["spool"], flush=True)
    sys.stdin.read()  # until the signal
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_main_process_leaves_no_spool(tmp_path, child, sig):
    """The main process dies (SIGKILL, or SIGTERM with no handler installed) without stop():
    its listener writes every record, exits, and removes the spool directory."""
    logs = tmp_path / "logs"
    p = child(_script(tmp_path, KILLED_MAIN_APP), str(logs))
    pid, spool = _read_tagged(p.stdout, "READY")
    listener = psutil.Process(int(pid))
    os.kill(p.pid, sig)  # the main process alone, not its group
    assert p.wait(10) == -sig
    listener.wait(30)  # raises TimeoutExpired if it lingers
    assert _numbered(_messages(logs / "run.debug.log"), "km") == list(range(3000))
    assert not os.path.exists(spool)
    assert _leftover_spools(logs) == []
    m = re.search(r"mplog stopped \(application gone\): (\d+) records written, (\d+) dropped, (\d+) lost",
                  (logs / "run.log").read_text())
    assert m and tuple(map(int, m.groups())) == (3000, 0, 0)


def _spools_cli(root: Path, *args: str) -> Dict[str, List[str]]:
    """Run ``python -m mplog spools --root ROOT ARGS``; return {spool path: [state, unwritten]}."""
    r = subprocess.run([sys.executable, "-m", "mplog", "spools", "--root", str(root), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {}
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 7 and parts[-2] == "->":
            rows[parts[-3]] = [parts[0], parts[1]]
    return rows


def test_spools_clean_command(tmp_path, child, service, monkeypatch):
    """``python -m mplog spools`` lists a SIGKILLed run's spool as an orphan with its unwritten
    records and a live service's spool as running; ``--clean`` removes an empty orphan at once,
    keeps the orphan that holds records (younger than --older-than) and the running one;
    ``--clean --older-than 0`` removes the orphan with records too."""
    root = tmp_path / "shm"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))  # a private spool root: others' spools untouched
    # An orphan with records: a run SIGKILLed (whole group) while its listener was stalled.
    n = 700
    logs = tmp_path / "killed"
    p = child(_script(tmp_path, KILLED_GROUP_APP), "fork", str(logs), str(n), env=_env(XDG_RUNTIME_DIR=str(root)))
    listener, killed_spool, _ = _read_tagged(p.stdout, "LISTENER")
    assert os.path.dirname(killed_spool) == str(root)
    with _Stall(int(listener)):
        p.stdin.write("go\n")
        p.stdin.flush()
        _read_tagged(p.stdout, "LOGGED")
        _kill_everything(p.pid, int(listener))
    p.wait(5)
    # A running service (this process) in the same root. (Started before the empty orphan is
    # made: a starting service removes empty orphans itself.)
    svc = service()
    live = svc.health()["queue"]["spool"]
    assert os.path.dirname(live) == str(root)
    assert os.path.isdir(killed_spool)  # an orphan with records is not the service's to remove
    # An empty orphan: a spool whose owner is gone and that holds nothing.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    empty = root / f"{spool_prefix(str(tmp_path / 'other'), 'run')}x1y2z3"
    empty.mkdir(mode=0o700)
    (empty / "owner").write_text(f"{int(dead.stdout)} 1\n{tmp_path / 'other'}\nrun\n")

    rows = _spools_cli(root)
    assert rows[killed_spool] == ["orphan", str(3 * n)]
    assert rows[str(empty)] == ["orphan", "0"]
    assert rows[live][0] == "running"

    rows = _spools_cli(root, "--clean")
    assert rows[str(empty)][0] == "removed" and not empty.exists()
    assert rows[killed_spool] == ["orphan", str(3 * n)] and os.path.isdir(killed_spool)
    assert rows[live][0] == "running" and os.path.isdir(live)

    rows = _spools_cli(root, "--clean", "--older-than", "0")
    assert rows[killed_spool][0] == "removed" and not os.path.exists(killed_spool)
    assert rows[live][0] == "running" and os.path.isdir(live)
    assert str(empty) not in rows
    logging.getLogger("live").info("still logging")
    assert svc.flush(10)
    final = svc.stop()["records"]
    _identity(final)
    assert final["written"] == 1
    assert sorted(os.listdir(root)) == []


def test_a_signal_handler_that_logs_inside_a_logging_call_neither_deadlocks_nor_loses(service):
    """SIGALRM every millisecond, its handler logging, while the main thread logs in a loop: a
    handler that interrupts the main thread inside its own logging call defers its record
    instead of deadlocking on the process's lock; every record of both arrives once."""
    import signal as _signal
    svc = service()
    log = logging.getLogger("sig")
    fired = []

    def handler(_num, _frame):
        fired.append(len(fired))
        log.info("from handler %d", fired[-1])

    previous = _signal.signal(_signal.SIGALRM, handler)
    _signal.setitimer(_signal.ITIMER_REAL, 0.001, 0.001)
    try:
        for i in range(20_000):
            log.info("main %d", i)
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0, 0)
        _signal.signal(_signal.SIGALRM, previous)
    assert svc.flush(30)
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    assert [m for m in msgs if m.startswith("main ")] == [f"main {i}" for i in range(20_000)]
    assert sorted(m for m in msgs if m.startswith("from handler ")) == sorted(
        f"from handler {k}" for k in range(len(fired)))
    assert len(fired) > 10


def test_threads_that_log_big_and_small_records_at_once_lose_tear_and_miscount_nothing(service):
    """The compiled ring publishes a small record in one C call without the process's lock; a big
    record (its own file, then a reference entry) and a full ring take the Python path, whose
    steps let other threads run (the big record's write() releases the GIL). Four threads at once,
    one of them with big records, into a ring with room: every record arrives once, in its thread's
    order, and the accounts close (sent = written). Without the hold that keeps the C call off
    the ring while the Python path has it, records are torn or counted twice or not at all."""
    svc = service(overflow="block", queue_size=1000)
    from mplog._app import channel as _channel_module  # the GIL switch lives with the channel
    channel = svc._handler.channel
    log = logging.getLogger("mix")
    big_pad = "b" * 100_000  # above the 384 KB ring's inline limit (96 KB)
    counts = {"big": 100}
    big_done = threading.Event()
    errors = []

    def small(tag):
        # until the big records are all in, so that the threads overlap whatever the machine
        i = 0
        try:
            while not big_done.is_set() or i < 1000:
                log.info("%s item %d", tag, i)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)
        counts[tag] = i

    def big():
        try:
            for i in range(counts["big"]):
                log.info("big item %d%s", i, big_pad)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)
        finally:
            big_done.set()

    threads = [threading.Thread(target=small, args=(f"s{k}",)) for k in range(3)] + [threading.Thread(target=big)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert svc.flush(60)
    msgs = _messages(svc.full_path)
    for k in range(3):
        assert _numbered(msgs, f"s{k}") == list(range(counts[f"s{k}"]))
    bigs = [m for m in msgs if m.startswith("big item ")]
    assert [m[:-len(big_pad)] for m in bigs] == [f"big item {i}" for i in range(counts["big"])]
    assert all(m.endswith(big_pad) for m in bigs)
    compiled = channel._publish is not None  # before stop(): it lets the ring go
    final = svc.stop()["records"]
    _identity(final)
    total = sum(counts.values())
    assert (final["sent"], final["written"], final["torn"], final["lost"]) == (total, total, 0, 0), final
    if _compiled.enabled() and _channel_module._GIL:
        assert compiled  # the C call was the hot path here


def test_a_child_that_logs_while_its_parent_logs_writes_a_ring_of_its_own(service, ctx):
    """The main process logs first, so its ring and the compiled publish() are set up; then a
    child logs while the main process goes on. Under fork the child logs through the handler it
    inherited (no initializer), with the parent's channel and the parent's ring, mapped shared:
    it must forget both (after_fork) and take a ring of its own, or the two processes write one
    ring and records are torn. Spawn and forkserver children install the handler."""
    svc = service()
    log = logging.getLogger("t.worker")
    n = 3000
    log.info("main item 0")
    if ctx.get_start_method() == "fork":
        child = ctx.Process(target=workers.log_n, args=(("child", n),))
    else:
        child = ctx.Process(target=workers.process_target, args=(svc.worker_config, "child", n))
    child.start()
    try:
        for i in range(1, n):
            log.info("main item %d", i)
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert svc.flush(30)
    msgs = _messages(svc.full_path)
    assert _numbered(msgs, "main") == list(range(n))
    assert _numbered(msgs, "child") == list(range(n))
    final = svc.stop()["records"]
    _identity(final)
    assert (final["written"], final["torn"], final["lost"]) == (2 * n, 0, 0), final


def test_a_ring_costs_memory_at_most_its_capacity(service):
    """After 60,000 records (several laps of a 3.8 MB ring) the spool holds at most one ring's
    capacity in memory: tmpfs pages are reused lap after lap, never added."""
    svc = service()
    log = logging.getLogger("mem")
    for i in range(60_000):
        log.info("memory %d %s", i, "m" * 60)
    assert svc.flush(60)
    q = svc.health()["queue"]
    assert q["rings"] == 1 and q["capacity_bytes"] >= 3_000_000
    assert q["bytes"] <= q["capacity_bytes"] + 4 * 4096, q


# -- the ring alone, in one process ------------------------------------------------------------
@pytest.fixture(params=["compiled", "python"])
def ring_impl(request, monkeypatch):
    """Each ring test runs with the compiled loops (mplog._speedups) and with the Python ones,
    which an install without a compiler runs (MPLOG_PURE_PYTHON=1 chooses them per ring)."""
    from mplog._common import spool as _spool
    if request.param == "compiled":
        if _spool._RingCore is None:
            pytest.skip("mplog._speedups is not built here (test_the_compiled_ring_loops_are_built says why)")
        monkeypatch.delenv("MPLOG_PURE_PYTHON", raising=False)
    else:
        monkeypatch.setenv("MPLOG_PURE_PYTHON", "1")
    return request.param


def _ring_pair(tmp_path, capacity=64 * 1024, max_records=1000):
    from mplog._common.spool import RingReader, open_ring_writer
    path = str(tmp_path / "ring.0")
    return open_ring_writer(path, capacity, max_records), RingReader(path, 0)


def _drain(reader, limit=10**6):
    t = reader.take(limit)
    reader.commit(t.pos, t.done)
    return t.payloads


def test_a_ring_carries_every_payload_in_order_over_many_laps(ring_impl, tmp_path):
    """Payloads of every size up to the inline limit, written while the reader takes some and
    lags: each wrap (a WRAP entry, or a tail too short for one) and each full ring is met many
    times, and every payload comes out once, in order."""
    import random
    writer, reader = _ring_pair(tmp_path)
    rng = random.Random(14)
    sent, got, refused = [], [], 0
    for i in range(20000):
        payload = (f"{i}:".encode() + bytes([i % 251]) * rng.choice([0, 1, 7, 8, 9, 100, 1000, 5000, 16000]))
        if writer.write(payload):
            sent.append(payload)
        else:
            refused += 1
            got.extend(_drain(reader, rng.randint(1, 50)))
            if writer.write(payload):
                sent.append(payload)
        if rng.random() < 0.05:
            got.extend(_drain(reader, rng.randint(1, 200)))
    got.extend(_drain(reader))
    assert refused > 100  # the ring was full many times
    assert writer._head > 20 * writer.capacity  # many laps
    assert got == sent and reader.corrupt == 0
    assert type(writer).__name__ == ("_CompiledRingWriter" if ring_impl == "compiled" else "RingWriter")
    assert (reader._take_entries is not None) == (ring_impl == "compiled")


def test_a_ring_is_full_at_exactly_its_records_and_its_bytes(ring_impl, tmp_path):
    writer, reader = _ring_pair(tmp_path, capacity=64 * 1024, max_records=100)
    assert sum(writer.write(b"x" * 10) for _ in range(150)) == 100  # records
    assert len(_drain(reader)) == 100
    assert sum(writer.write(b"x" * 10) for _ in range(150)) == 100  # and again, once the reader took them
    (tmp_path / "bytes").mkdir()
    writer, reader = _ring_pair(tmp_path / "bytes", capacity=64 * 1024, max_records=100)
    big = b"y" * 4000  # 4016 bytes an entry: 16 fit in 64 KiB
    assert sum(writer.write(big) for _ in range(40)) == 16  # bytes
    assert len(_drain(reader, 3)) == 3
    assert sum(writer.write(big) for _ in range(40)) == 3  # room again, as much as was freed


def test_the_compiled_ring_loops_are_built_where_a_compiler_is():
    """setup.py builds mplog._speedups as optional: a failed build only says so in pip's output.
    Where this machine has a C compiler and Python's headers, it must have been built."""
    import shutil
    import sysconfig
    from mplog._common import spool as _spool
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not (shutil.which("cc") or shutil.which("gcc")) or not os.path.exists(headers):
        pytest.skip("no C compiler or no Python headers here: mplog runs its ring loops in Python")
    assert _spool._RingCore is not None, "mplog._speedups did not build: see the output of pip install"


def test_the_compiled_adler32_is_zlibs():
    import random
    import zlib
    from mplog._common import spool as _spool
    if _spool._RingCore is None:
        pytest.skip("mplog._speedups is not built here")
    from mplog._speedups import adler32
    rng = random.Random(3)
    # Around the 5552-byte block where the sums are reduced, and all-0xff (the largest sums).
    for n in [0, 1, 7, 8, 9, 15, 16, 17, 5551, 5552, 5553, 11104, 11105, 100_000]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert adler32(data) == zlib.adler32(data), n
        assert adler32(b"\xff" * n) == zlib.adler32(b"\xff" * n), n
    assert adler32(memoryview(b"abc")[1:]) == zlib.adler32(b"bc")


def test_the_compiled_and_python_rings_write_the_same_bytes(tmp_path, monkeypatch):
    """The Python loops are the reference: fed the same payloads and drained alike (wraps, full
    rings, big records in files of their own), both leave the same ring file, and each side
    reads what the other wrote."""
    import random
    from mplog._common import spool as _spool
    if _spool._RingCore is None:
        pytest.skip("mplog._speedups is not built here")
    rings = {}
    for impl in ("compiled", "python"):
        if impl == "python":
            monkeypatch.setenv("MPLOG_PURE_PYTHON", "1")
        (tmp_path / impl).mkdir()
        path = str(tmp_path / impl / "ring.0")
        writer = _spool.open_ring_writer(path, 64 * 1024, 500)
        # The reader of the other implementation: python reads the compiled ring and back.
        monkeypatch.setenv("MPLOG_PURE_PYTHON", "1") if impl == "compiled" else monkeypatch.delenv("MPLOG_PURE_PYTHON")
        reader = _spool.RingReader(path, 0)
        assert (reader._take_entries is None) == (impl == "compiled")
        rng = random.Random(7)
        got, results = [], []
        for i in range(6000):
            payload = f"{i}:".encode() + bytes([i % 256]) * rng.choice([0, 3, 8, 200, 3000, 20000])
            results.append(writer.write(payload))
            if rng.random() < 0.03:
                got.extend(_drain(reader, rng.randint(1, 300)))
        got.extend(_drain(reader))
        writer.close()
        with open(path, "rb") as f:
            rings[impl] = (f.read(), results, got, sorted(os.listdir(tmp_path / impl)))
        monkeypatch.delenv("MPLOG_PURE_PYTHON", raising=False)
    compiled, python = rings["compiled"], rings["python"]
    assert compiled[1] == python[1]
    assert False in compiled[1] and compiled[1].count(True) > 3000  # full at times, mostly taken
    assert compiled[2] == python[2] and len(compiled[2]) == compiled[1].count(True)
    assert compiled[3] == python[3]  # the big records' own files, each removed once taken
    header = _spool.RING_HEADER
    words = [w for w in range(header // 8) if w != _spool.W_PID and w != _spool.W_START]
    as_words = [memoryview(r[0][:header]).cast("q") for r in (compiled, python)]
    assert [as_words[0][w] for w in words] == [as_words[1][w] for w in words]
    assert compiled[0][header:] == python[0][header:]


def test_publish_record_writes_what_marshal_writes_and_leaves_the_rest_to_the_python_path(tmp_path):
    """The caller's hot path in one C call (RingCore.publish_record): the entry it writes is
    marshal.dumps((TAG_COMMON, the fields), 2), byte for byte; whatever it does not write (a big
    int, a mapping, a lone surrogate, an object, a key missing) it answers 0 to and writes
    nothing, so the Python path meets it with marshal. It counts what it publishes, says when the
    listener sleeps, and does nothing while the service is stopped or the Python path holds it."""
    import marshal
    from mplog._common import counters as _counters
    from mplog._common import record as _record
    from mplog._common import spool as _spool
    if _spool._RingCore is None:
        pytest.skip("mplog._speedups is not built here")
    writer = _spool.open_ring_writer(str(tmp_path / "ring.0"), 64 * 1024, 500)
    reader = _spool.RingReader(str(tmp_path / "ring.0"), 0)
    words = memoryview(bytearray(8 * 16)).cast("q")
    sent, sleeping = 10, 11
    writer._attach_words(words, 1, sent, sleeping, _counters.STATE_STOPPED, _record.LEAN_KEYS, _record.TAG_COMMON)
    assert writer.publish_record({}) == 0  # held until the Python path lets it go
    writer._hold = 0

    def record(*args):
        return logging.LogRecord("app", logging.INFO, "/a/b.py", 3, "m" + " %r" * len(args), args or None, None)

    plain = [(), (1,), ("s", "é", ""), (1.5, float("inf"), -0.0), (None, True, False), (b"raw",), ((1, ("x", 2.5)),),
             (-2 ** 31, 2 ** 31 - 1)]
    deferred = [(2 ** 31,), (2 ** 70,), ({"k": 1},), ("\udc80",), (object(),), ([1],), (1j,)]
    by_marshal = []  # what the Python path then writes with marshal
    for args in plain + deferred:
        d = record(*args).__dict__
        try:
            expected = marshal.dumps((_record.TAG_COMMON, _record.lean_fields(d)), 2)
            by_marshal.append(args)
        except ValueError:
            expected = None
        before = (writer._seq, words[sent])
        done = writer.publish_record(d)
        if args in plain:
            assert done == 1, args
            assert (writer._seq, words[sent]) == (before[0] + 1, before[1] + 1)
            assert _drain(reader) == [expected], args
        else:
            assert done == 0, args
            assert (writer._seq, words[sent]) == before and _drain(reader) == []
    assert all(args in by_marshal for args in [(2 ** 31,), (2 ** 70,), ("\udc80",), (1j,)])
    d = record(1).__dict__
    del d["lineno"]
    assert writer.publish_record(d) == 0
    d = record(7).__dict__
    words[sleeping] = 1
    assert writer.publish_record(d) == 2 and len(_drain(reader)) == 1
    words[sleeping] = 0
    words[1] = _counters.STATE_STOPPED
    assert writer.publish_record(d) == 0 and _drain(reader) == []
    words[1] = 0
    writer._hold = 1
    assert writer.publish_record(d) == 0
    writer._hold = 0
    assert writer.publish_record(d) == 1 and len(_drain(reader)) == 1
    writer.close()
    reader.close()


def test_a_ring_of_the_previous_layout_is_still_read(tmp_path, monkeypatch):
    """Rings written by mplog before 0.2 check their entries with CRC-32: the next run still
    recovers them (layout 1); anything else is not taken for a ring."""
    import zlib
    from mplog._common import spool as _spool
    monkeypatch.setattr(_spool, "checksum", zlib.crc32)
    monkeypatch.setattr(_spool, "_WRAP_CHECK", zlib.crc32(b""))
    writer = _spool.RingWriter(str(tmp_path / "ring.0"), 64 * 1024, 1000)
    writer.words[_spool.W_MAGIC] = _spool._MAGIC_CRC32
    for i in range(600):  # past a wrap
        assert writer.write(b"%d" % i + b"z" * 200) or _drain(_spool.RingReader(str(tmp_path / "ring.0"), 0))
    monkeypatch.undo()
    reader = _spool.RingReader(str(tmp_path / "ring.0"), 0)
    assert reader.check is zlib.crc32
    assert len(_drain(reader)) > 0 and reader.corrupt == 0
    writer.words[_spool.W_MAGIC] = 12345
    with pytest.raises(OSError, match="not an mplog ring"):
        _spool.RingReader(str(tmp_path / "ring.0"), 0)


def _resident(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_REMOVE"), reason="no MADV_REMOVE")
def test_a_slow_ring_gives_its_pages_back_and_a_busy_one_keeps_them(ring_impl, tmp_path, monkeypatch):
    """A ring that laps in less than BUSY_LAP keeps its pages (giving them back would cost its
    writer a page fault per page per lap); once it laps slower, each batch's pages are given
    back as they are consumed, and the ring costs memory for its backlog only."""
    from mplog._common import spool as _spool
    clock = [1000.0]
    monkeypatch.setattr(_spool.time, "monotonic", lambda: clock[0])
    writer, reader = _ring_pair(tmp_path, capacity=256 * 1024, max_records=10**6)
    path = str(tmp_path / "ring.0")
    payload = b"p" * 1000

    def laps(n, seconds_each):
        for _ in range(n):
            written = 0
            while written < writer.capacity:
                while not writer.write(payload):
                    _drain(reader, 20)
                written += 1024
                if written % (16 * 1024) == 0:
                    _drain(reader, 20)
            clock[0] += seconds_each
        _drain(reader)

    writer.write(payload)
    _drain(reader)
    assert reader.busy and _resident(path) > 0  # its first lap: taken for busy
    laps(3, 0.1)  # busy: a lap every 0.1 s
    assert reader.busy
    busy = _resident(path)
    assert busy >= writer.capacity - 8 * 4096  # every page kept, though the ring is empty
    laps(2, _spool.BUSY_LAP + 1)  # slow: given back as consumed
    assert not reader.busy and reader.backlog() == 0
    # What stays is the page holding each batch's start (the writer may be in it): 1 in 5 here.
    assert _resident(path) * 3 < busy


def test_busy_rings_keep_pages_only_within_the_spools_budget(tmp_path):
    """However many processes log fast, the pages kept by busy rings stay within KeepBudget
    (32 MB a spool by default): the others give theirs back, so a 64 MB /dev/shm does not fill
    with empty pages. A share given up is taken by the next busy ring at its next lap."""
    from mplog._common.spool import KeepBudget, RingReader, RingWriter
    cap = 64 * 1024
    budget = KeepBudget(2 * cap)
    readers = []
    for i in range(3):
        RingWriter(str(tmp_path / f"ring.{i}"), cap, 100)
        readers.append(RingReader(str(tmp_path / f"ring.{i}"), i, budget))
    assert [r.busy for r in readers] == [True, True, False]
    readers[2].commit(100, 0)  # a batch in its first lap: still over the budget
    assert not readers[2].busy
    readers[0].close()  # its process is gone: its share is free
    readers[2].commit(cap + 100, 0)  # its next lap, fast: it may keep its pages now
    assert readers[2].busy and len(budget.kept) == 2


def test_a_worker_costs_little_memory_beyond_its_ring(service):
    """A spawn worker that logs 5,000 records through the service costs little private memory
    more than a plain spawn worker: issue 14 asks for 2 MB; measured 1.5 MB (with .pyc files)
    to 1.8 MB (without: every import compiles); the bound leaves room for other interpreters.
    The ring's pages are shared memory, bounded by queue_size, and counted apart. mplog loads
    no hashlib (OpenSSL, 3.6 MB) and no dataclasses (inspect, ast, dis: 1 MB) in a worker."""
    import multiprocessing
    import plainworker
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        plain = pool.apply(plainworker.private_rss_kb, (0,))
    svc = service()
    with ctx.Pool(1, **svc.pool_kwargs()) as pool:
        logged = pool.apply(plainworker.private_rss_kb, (5000,))
    assert svc.flush(30)
    assert logged - plain <= 2560, (plain, logged)
    out = subprocess.run([sys.executable, "-c", "import sys, mplog; mplog.worker_init; "
                          "print(sorted({'hashlib', 'dataclasses', 'psutil'} & set(sys.modules)))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out


def test_a_running_service_keeps_heavy_modules_out_of_what_a_fork_inherits(tmp_path):
    """A forked worker maps what its parent had: every module the main process's service
    imports is in every forked worker's RSS. dataclasses (with inspect, ast and dis) and the code
    it generated for the configs were 1.4 MB of it, uuid (libuuid) 0.1 MB, the listener's exit
    watch (mplog._listener.exits, which health needed only for its death word) 0.16 MB; the listener's
    other modules have no business there either, and psutil (1.0 MB) neither: the listener
    samples itself for health."""
    script = textwrap.dedent(f"""
        import logging, sys
        import mplog
        with mplog.LogService({str(tmp_path)!r}, name="m") as svc:
            logging.getLogger("t").info("one record")
            assert svc.flush(30)
            svc.health()
            print(sorted({{"dataclasses", "inspect", "ast", "dis", "uuid", "mplog._listener.exits", "mplog._listener",
                          "mplog._listener.files", "mplog._common.format", "gzip"}} & set(sys.modules)))
            print("psutil" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    assert out.stdout.split("\n")[:2] == ["[]", "False"], out
