"""The spool's room (issue 29, item 1): no store of mplog's touches a page the filesystem has not
reserved, so a full tmpfs is a full ring (the overflow policy, counted), never a SIGBUS.

The pipeline tests mount a small tmpfs as ``XDG_RUNTIME_DIR`` (skipped where mounting is not
allowed), stop the listener (SIGSTOP, a hung disk) while the workers log, resume it (SIGCONT)
once every worker has ended, and check that no worker died and that every logging call is in
``sent = written + dropped + diverted + lost``. Each prints the figures it measured.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import Dict

import psutil
import pytest

import mplog
from conftest import app_blocks, wait_for

import workers

RECORDS = 20_000
PAD = "p" * 300  # records of ~450 bytes: a ring is full at its bytes, not at its records


def _stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _stalled_run(ctx, logs, shm, n_workers: int, **options) -> Dict[str, object]:
    """Start a service, stop its listener, run ``n_workers`` processes that log RECORDS each,
    resume the listener once they have all ended, stop; the figures measured."""
    svc = mplog.LogService(logs, overflow="drop", shutdown_timeout=60, **options)
    svc.start()
    try:
        queue = svc.health()["queue"]
        listener = svc.health()["listener"]["pid"]
        os.kill(listener, signal.SIGSTOP)
        try:
            wait_for(lambda: _stopped(listener), timeout=10, what="the listener to stop")
            procs = [ctx.Process(target=workers.process_target, args=(svc.worker_config, f"w{i} {PAD}", RECORDS))
                     for i in range(n_workers)]
            for p in procs:
                p.start()
            peak = 0
            deadline = time.monotonic() + 240
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                peak = max(peak, _used(shm))
                time.sleep(0.02)  # sampling the spool's use while waiting for the workers to end
            for p in procs:
                p.join(10)
            exits = [p.exitcode for p in procs]
        finally:
            os.kill(listener, signal.SIGCONT)
        assert svc.flush(120)
    finally:
        final = svc.stop()
    r = final["records"]
    figures = {"workers": n_workers, "exits": sorted(set(exits)), "sent": r["sent"], "written": r["written"],
               "dropped": r["dropped"], "diverted": r["diverted"], "lost": r["lost"],
               "spool": queue["spool"], "filesystem": queue.get("filesystem"), "peak_tmpfs_used": peak,
               "in_files": len(app_blocks(svc.full_path))}
    print("\nroom figures:", figures)
    assert exits == [0] * n_workers, f"workers died: {exits}"
    assert r["sent"] == n_workers * RECORDS, figures
    assert r["sent"] == r["written"] + r["dropped"] + r["diverted"] + r["lost"], figures
    assert figures["in_files"] == r["written"], figures
    return figures


@pytest.mark.timeout(600)
@pytest.mark.parametrize("queue_size", [10_000, 5_000], ids=["default-rings", "small-rings"])
def test_an_8mib_tmpfs_and_a_stalled_listener_kill_no_worker(tmpfs, tmp_path, monkeypatch, ctx, queue_size):
    """8 workers on an 8 MiB tmpfs as XDG_RUNTIME_DIR. At the default queue_size the rings do
    not fit: the spool goes to the next root with the room (/dev/shm, else TMPDIR or /var/tmp on disk), and says so in the log. With rings small
    enough to be placed there (1.8 MiB), the stall fills the tmpfs: the rings that get no room
    are full and drop, counted; before the fix every worker died of SIGBUS."""
    shm = tmpfs("shm", "8m")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shm))
    figures = _stalled_run(ctx, tmp_path / "logs", str(shm), 8, queue_size=queue_size)
    in_tmpfs = str(figures["spool"]).startswith(str(shm))
    notices = [b["message"] for b in mplog_blocks(tmp_path / "logs" / "run.debug.log")]
    if queue_size == 10_000:
        assert not in_tmpfs, figures
        assert any("the spool is in" in m for m in notices), notices
    else:
        assert in_tmpfs, figures
        assert figures["dropped"] > 0 and figures["peak_tmpfs_used"] > 7 * 2**20, figures


def mplog_blocks(path):
    from conftest import read_blocks
    return [b for b in read_blocks(path) if b["logger"] == "mplog"]


@pytest.mark.timeout(900)
def test_a_64mib_tmpfs_and_32_stalled_workers_kill_no_worker(tmpfs, tmp_path, monkeypatch, ctx):
    """32 workers on a 64 MiB tmpfs (Docker's /dev/shm) at the default queue_size: placed on the
    tmpfs (it holds the rings of this machine's CPUs), whose room the stall exhausts (32 full
    rings would take 118 MiB). No worker dies; every record is counted."""
    shm = tmpfs("shm", "64m")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shm))
    figures = _stalled_run(ctx, tmp_path / "logs", str(shm), 32)
    assert str(figures["spool"]).startswith(str(shm)), figures
    assert figures["dropped"] > 0 and figures["peak_tmpfs_used"] > 60 * 2**20, figures


# -- the ring and the counters alone -------------------------------------------------------------
def _fill_ring_on_a_full_tmpfs(path: str, conn) -> None:
    """In a child: a ring of 1 MiB on a 256 KiB tmpfs, written until it refuses."""
    from mplog._common.spool import RingReader, open_ring_writer
    writer = open_ring_writer(path, 1024 * 1024, 10**6)
    reader = RingReader(path, 0)
    accepted = refused = 0
    for i in range(5000):
        if writer.write(b"r" * 400):
            accepted += 1
        else:
            refused += 1
    taken = reader.take(10**6)
    conn.send((accepted, refused, len(taken.payloads), type(writer).__name__))


@pytest.mark.parametrize("impl", ["compiled", "python"])
def test_a_ring_on_a_full_tmpfs_refuses_and_nothing_dies(tmpfs, monkeypatch, impl):
    """The writer returns False where the filesystem has no room for the next page; the process
    lives, and every record it accepted is read back."""
    import multiprocessing
    from mplog._common import spool as _spool
    if impl == "compiled" and _spool._RingCore is None:
        pytest.skip("mplog._speedups is not built here")
    monkeypatch.setenv("MPLOG_PURE_PYTHON", "1") if impl == "python" else monkeypatch.delenv("MPLOG_PURE_PYTHON",
                                                                                             raising=False)
    mnt = tmpfs("tiny", "256k")
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_fill_ring_on_a_full_tmpfs, args=(str(mnt / "ring.0"), theirs))
    p.start()
    got = mine.recv() if mine.poll(60) else None
    p.join(30)
    assert p.exitcode == 0, f"the writer died: {p.exitcode}"
    accepted, refused, read, kind = got
    print("\nring on a 256 KiB tmpfs:", {"accepted": accepted, "refused": refused, "read": read, "writer": kind})
    assert 0 < accepted < 5000 and refused == 5000 - accepted and read == accepted


def _claim_on_a_full_tmpfs(path: str, conn) -> None:
    """In a child: counters on a tmpfs, which is then filled; claims past the reserved slots."""
    from mplog._common.counters import MAX_SLOTS, Counters
    counters = Counters.create(path)
    fd = os.open(os.path.join(os.path.dirname(path), "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # ENOSPC: the tmpfs is full
    finally:
        os.close(fd)
    slots = [counters.claim_slot(1000 + i).index for i in range(300)]
    slots[-1] and counters.slot(slots[-1]).add(1)  # a store into the last slot handed out
    try:
        Counters.create(path + ".2")
        second = "made"
    except OSError as exc:
        second = errno.errorcode.get(exc.errno or 0, str(exc))
    conn.send((slots.count(MAX_SLOTS - 1), len(set(slots)), second))


def test_counters_on_a_full_tmpfs_hand_out_reserved_slots_only(tmpfs):
    """Claims past the slots reserved at creation, on a full tmpfs, get the shared overflow
    slot (its page reserved at creation) rather than a page the tmpfs cannot back; a counter
    file that finds no room is an OSError. The process lives."""
    import multiprocessing
    mnt = tmpfs("counters", "256k")
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=_claim_on_a_full_tmpfs, args=(str(mnt / "counters"), theirs))
    p.start()
    got = mine.recv() if mine.poll(60) else None
    p.join(30)
    assert p.exitcode == 0, f"the claimer died: {p.exitcode}"
    overflow, distinct, second = got
    print("\ncounters on a full tmpfs:", {"overflow_claims": overflow, "distinct_slots": distinct, "second": second})
    assert overflow > 0 and distinct < 300 and second == "ENOSPC"


def test_a_tmpfs_without_room_for_the_rings_is_passed_over_with_a_notice(tmpfs, tmp_path, monkeypatch):
    """The first root whose free room holds a full ring per CPU (and the main process's) is
    chosen; the notice names the one passed over and the room it lacked."""
    from mplog._common import spool as _spool
    small = tmpfs("small", "8m")
    disk = tmp_path / "disk"
    disk.mkdir()
    monkeypatch.setattr(_spool, "spool_roots", lambda: [str(small), str(disk)])
    ring = _spool.RING_HEADER + _spool.ring_capacity(10_000)
    placement = _spool.place_spool(ring)
    print("\nplacement:", placement)
    assert placement.need == _spool.expected_processes() * ring + _spool.COUNTER_BYTES
    assert placement.root == str(disk) and f"{small} (tmpfs) has 8.0 MiB free" in placement.notice
    assert _spool.place_spool(_spool.RING_HEADER + _spool.ring_capacity(100)).root == str(small)


@pytest.mark.timeout(600)
def test_processes_past_the_reserved_slots_on_a_full_spool_are_counted(tmpfs, tmp_path, monkeypatch, ctx):
    """On a spool filesystem full from the start, more processes log than the counters have
    reserved slots for: those past them share the counters' overflow slot. Each process's
    records are counted once and the stop report balances: ``sent`` is every record logged."""
    from mplog._common.counters import _SLOTS_AT_START, HEADER_WORDS, SLOT_WORDS
    # The slots whose pages the counters reserve at creation: 84 asked, the pages they fill hold more.
    page = os.sysconf("SC_PAGE_SIZE")
    reserved = (-(-8 * (HEADER_WORDS + SLOT_WORDS * _SLOTS_AT_START) // page) * page - 8 * HEADER_WORDS) // (8 * SLOT_WORDS)
    shm = tmpfs("shm", "16m")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shm))
    svc = mplog.LogService(tmp_path / "logs", overflow="drop", queue_size=100, shutdown_timeout=60).start()
    filler = shm / "filler"
    exits = []
    try:
        assert svc.health()["queue"]["spool"].startswith(str(shm))
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (1 << 20, 4096):
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError:
                    pass  # ENOSPC: nothing more of the spool gets a page
        finally:
            os.close(fd)
        n = reserved + 6  # the main process has a slot too: the last 7 share the overflow slot
        for i in range(n):  # one at a time: the overflow slot's increments are not atomic across processes
            p = ctx.Process(target=workers.process_target_stderr,
                            args=(svc.worker_config, f"slot {i}", 3, str(tmp_path / "stderr")))
            p.start()
            p.join(60)
            exits.append(p.exitcode)
        svc.flush(60)
    finally:
        final = svc.stop()
        filler.unlink()
    r = final["records"]
    print("\npast the reserved slots:", {"processes": n, **{k: r[k] for k in ("sent", "written", "dropped", "diverted", "lost")}})
    assert exits == [0] * n
    shared = n - (reserved - 1)  # the processes in the overflow slot: their records go to stderr
    assert r["sent"] == 3 * n, r
    assert r["sent"] == r["written"] + r["dropped"] + r["diverted"] + r["lost"], r
    assert r["diverted"] == 3 * shared, r
    err = (tmp_path / "stderr").read_text()
    assert sum(f"slot {i} " in err for i in range(n)) == shared, err[-2000:]
