"""Overflow policies against a real stalled listener (SIGSTOP), and bounded worker memory."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

import psutil
import pytest

from conftest import app_blocks, wait_for


def _stall(svc):
    pid = svc.health()["listener"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    return pid


def _fill_until_dropped(log, svc, want_drops=50, limit=400_000):
    sent = 0
    while svc.health()["records"]["dropped"] < want_drops and sent < limit:
        for _ in range(1000):
            log.info("filler %d %s", sent, "y" * 80)
            sent += 1
    return sent


@pytest.mark.parametrize("policy", ["drop", "timeout", "stderr"])
def test_policies_drop_and_count_when_full(service, capfd, policy):
    svc = service(overflow=policy, overflow_timeout=0.001, queue_size=100)
    log = logging.getLogger("ovf")
    pid = _stall(svc)
    try:
        sent = _fill_until_dropped(log, svc)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert svc.flush(30)
    h = svc.health()
    r = h["records"]
    assert r["dropped"] >= 50
    assert r["sent"] == sent
    assert r["written"] + r["dropped"] == sent  # every record accounted for
    assert len(app_blocks(svc.full_path)) == r["written"]
    err = capfd.readouterr().err
    if policy == "stderr":
        assert err.count("[DROPPED] ") == r["dropped"]
    else:
        notices = [ln for ln in err.splitlines() if "dropped by process" in ln]
        assert 1 <= len(notices) <= 5  # one summary a second, not one per record
        assert "[DROPPED]" not in err


def test_block_waits_and_loses_nothing(service):
    svc = service(overflow="block", queue_size=100)
    log = logging.getLogger("blk")
    pid = _stall(svc)
    done = threading.Event()
    count = 20_000

    def produce():
        for i in range(count):
            log.info("blocked %d", i)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    # The producer must be stuck behind its full ring while the listener is stopped.
    wait_for(lambda: svc.health()["queue"]["depth"] >= 100, what="the ring to fill")
    assert not done.is_set()
    os.kill(pid, signal.SIGCONT)
    t.join(60)
    assert done.is_set()
    assert svc.flush(30)
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    assert msgs == [f"blocked {i}" for i in range(count)]
    assert svc.health()["records"]["dropped"] == 0


def test_stalled_listener_reads_degraded_then_recovers(service):
    svc = service()
    log = logging.getLogger("stall")
    pid = _stall(svc)
    try:
        log.info("waiting")
        h = wait_for(lambda: (lambda h: h if h["status"] == "degraded" else None)(svc.health()), timeout=10,
                     what="degraded status")
        assert h["listener"]["alive"]  # the pid runs; the service still is not healthy
        assert "none was written for 2 s" in h["reason"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert svc.flush(30)
    assert svc.health()["status"] == "healthy"


def test_stop_returns_within_timeout_with_stuck_listener(service):
    """A listener that never reads again (SIGSTOP) cannot make stop() hang; what it could not
    write is reported as lost, not silently discarded."""
    svc = service(shutdown_timeout=1.0, queue_size=100, overflow="drop")
    log = logging.getLogger("stuck")
    _stall(svc)
    _fill_until_dropped(log, svc, want_drops=1)
    t0 = time.monotonic()
    final = svc.stop()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 0.5 + 1.0, elapsed  # the contract is 1.5 s; 1 s of slack for a noisy CI
    r = final["records"]
    assert final["status"] == "down"
    assert r["sent"] == r["written"] + r["dropped"] + r["lost"]
    assert r["lost"] > 0
    # What it could not write stays in the spool for the next run on these files.
    assert r["kept_in_spool"] == r["lost"] and os.path.isdir(final["spool_kept"])
    shutil.rmtree(final["spool_kept"])


def test_worker_memory_bounded_when_listener_stalled(service):
    """No buffer in the process: 200,000 calls against a stopped listener (overflow=drop) grow
    this process's RSS by under 5 MB."""
    svc = service(overflow="drop", queue_size=100)
    log = logging.getLogger("mem")
    pid = _stall(svc)
    try:
        for i in range(5000):  # warm up allocator pools and caches
            log.info("warm %d", i)
        rss0 = psutil.Process().memory_info().rss
        for i in range(200_000):
            log.info("mem %d %s", i, "z" * 50)
        rss1 = psutil.Process().memory_info().rss
    finally:
        os.kill(pid, signal.SIGCONT)
    assert rss1 - rss0 < 5 * 1024 * 1024, (rss0, rss1)
    assert svc.health()["records"]["dropped"] > 190_000


def test_stop_with_a_big_record_in_the_spool_counts_it_once(service):
    """A 4 MB record (a file of its own beside the ring) waiting when stop() gives up on a stuck
    listener: the writer's logging call returns at once, and the final report counts the record
    once, as lost and kept in the spool."""
    svc = service(shutdown_timeout=1.0, queue_size=100)
    pid = _stall(svc)
    log = logging.getLogger("big")
    done = threading.Event()

    def produce():
        log.info("big %s", "b" * (4 * 1024 * 1024))
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    wait_for(lambda: svc.health()["records"]["sent"] == 1, what="the first chunk in the pipe")
    final = svc.stop()
    t.join(30)
    assert done.is_set()
    r = final["records"]
    assert (r["sent"], r["written"], r["diverted"], r["dropped"], r["lost"]) == (1, 0, 0, 0, 1)
    shutil.rmtree(final["spool_kept"])
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
