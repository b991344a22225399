"""Accounting at the edges: a listener killed between its write and its count, with a logrotate
in between; a writer killed between its write and its count."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

import pytest

from mplog._counters import Counters, settle_accounts
from mplog._listener import Listener
from mplog._record import make_record
from conftest import app_blocks, read_blocks, wait_for


def _listener(tmp_path, counters_path):
    cfg = {"counters_path": str(counters_path), "simplified_path": str(tmp_path / "run.log"),
           "full_path": str(tmp_path / "run.debug.log"), "level": 10, "simplified_level": 20,
           "flush_count": 100, "fifo_path": ""}
    listener = Listener(cfg)
    listener.open_files()
    return listener


def _announce_and_write(listener, n, write=True, partial=False):
    """What a listener does for a batch, stopping where a SIGKILL would: after the write (or
    half of it), before counting it."""
    for i in range(n):
        listener.handle(make_record(time.time(), logging.INFO, "acct", f"record {i}"))
    listener._n = 0
    full = "".join(listener._full).encode()
    simp = "".join(listener._simp).encode()
    listener._full.clear()
    listener._simp.clear()
    listener.announce(len(full), len(simp), n)
    listener.counters.add("received", n)
    if write:
        os.write(listener.simp.fd, simp)
        os.write(listener.fullf.fd, full[: len(full) // 2] if partial else full)
    listener.close_files()  # the process dies


@pytest.mark.parametrize("rotated", [False, True])
def test_killed_after_write_batch_counts_as_written_even_if_rotated(tmp_path, rotated):
    counters = Counters.create(str(tmp_path / "counters"))
    _announce_and_write(_listener(tmp_path, tmp_path / "counters"), 10)
    if rotated:  # logrotate between the kill and the restart
        os.rename(tmp_path / "run.debug.log", tmp_path / "run.debug.log.1")
        os.rename(tmp_path / "run.log", tmp_path / "run.log.1")
    successor = _listener(tmp_path, tmp_path / "counters")
    assert successor.settle_previous() == 0
    assert (counters.get("written"), counters.get("lost_listener"), counters.get("pending")) == (10, 0, 0)
    kept = tmp_path / ("run.debug.log.1" if rotated else "run.debug.log")
    assert [b["message"] for b in app_blocks(kept)] == [f"record {i}" for i in range(10)]


@pytest.mark.parametrize("rotated", [False, True])
def test_killed_mid_write_batch_is_lost_and_cut_back(tmp_path, rotated):
    counters = Counters.create(str(tmp_path / "counters"))
    first = _listener(tmp_path, tmp_path / "counters")
    _announce_and_write(first, 4)  # a complete batch, counted
    counters.add("written", 4)
    counters.set("pending", 0)
    _announce_and_write(_listener(tmp_path, tmp_path / "counters"), 6, partial=True)
    if rotated:
        os.rename(tmp_path / "run.debug.log", tmp_path / "run.debug.log.1")
    successor = _listener(tmp_path, tmp_path / "counters")
    assert successor.settle_previous() == 6
    assert (counters.get("written"), counters.get("lost_listener")) == (4, 6)
    kept = tmp_path / ("run.debug.log.1" if rotated else "run.debug.log")
    assert [b["message"] for b in read_blocks(kept)] == [f"record {i}" for i in range(4)]  # no half block


def test_read_but_not_written_is_lost(tmp_path):
    counters = Counters.create(str(tmp_path / "counters"))
    counters.add("received", 7)  # the dead listener read 7 records and wrote none
    assert _listener(tmp_path, tmp_path / "counters").settle_previous() == 7
    assert counters.get("lost_listener") == 7


@pytest.mark.parametrize("sent, written, in_doubt, want", [
    (10, 10, 0, {"sent": 10, "lost": 0, "unattributed": 0, "in_doubt_sent": 0, "unexplained": 0}),
    # a writer killed after its write, before its count: written, recovered as sent
    (9, 10, 1, {"sent": 10, "lost": 0, "unattributed": 0, "in_doubt_sent": 1, "unexplained": 0}),
    # a writer killed while it waited for room: in doubt, but never written: not sent
    (10, 10, 1, {"sent": 10, "lost": 0, "unattributed": 0, "in_doubt_sent": 0, "unexplained": 0}),
    # a loss no counter saw is shown, not hidden
    (12, 10, 0, {"sent": 12, "lost": 2, "unattributed": 2, "in_doubt_sent": 0, "unexplained": 0}),
    # more written than any writer can explain (a foreign writer)
    (10, 12, 1, {"sent": 11, "lost": 0, "unattributed": 0, "in_doubt_sent": 1, "unexplained": 1}),
])
def test_settle_accounts(sent, written, in_doubt, want):
    assert settle_accounts(sent, written, 0, 0, 0, in_doubt) == want


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to stop a writer right after its write()")
def test_writer_killed_between_write_and_count(service, ctx, tmp_path):
    """strace holds the worker right after its write() returns; SIGKILL it there: the record is
    in the file, and stop() settles it as sent."""
    svc = service()
    import workers
    p = ctx.Process(target=workers.log_after_go, args=(svc.worker_config, str(tmp_path / "go")))
    p.start()
    wait_for(lambda: (tmp_path / "go.ready").exists(), what="the worker to be ready")
    tracer = subprocess.Popen(["strace", "-p", str(p.pid), "-f", "-e", "trace=write", "-P",
                               svc.worker_config.fifo_path, "-e", "inject=write:delay_exit=5000000:when=1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "TracerPid:\t0\n" not in open(f"/proc/{p.pid}/status").read(), what="strace attached")
        (tmp_path / "go").write_text("go")
        wait_for(lambda: svc.flush(1) and len(app_blocks(svc.full_path)) == 1, what="the record written")
        p.kill()
        p.join(10)
    finally:
        tracer.kill()
        tracer.wait(10)
    final = svc.stop()
    r = final["records"]
    assert (r["sent"], r["written"], r["lost"], r["in_doubt_sent"]) == (1, 1, 0, 1)
