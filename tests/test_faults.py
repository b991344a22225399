"""The world around the processes: worker churn, read-only filesystems, hostile records."""

from __future__ import annotations

import logging
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor

import psutil
import pytest

import mplog
from conftest import app_blocks, wait_for

import workers


def _listener_resources(svc):
    p = psutil.Process(svc.health()["listener"]["pid"])
    with p.oneshot():
        return p.num_fds(), p.num_threads(), p.memory_info().rss


def test_worker_churn_leaks_nothing_in_the_listener(service, ctx):
    """maxtasksperchild=1: a fresh process per task (1,000 under fork, 150 under spawn and
    forkserver, which start a new interpreter each). The listener's fds, threads and memory
    are the same after."""
    n = 1000 if ctx.get_start_method() == "fork" else 150
    svc = service()
    with ctx.Pool(2, maxtasksperchild=1, **svc.pool_kwargs()) as pool:
        pool.map(workers.short_task, range(20))
    assert svc.flush(30)
    # The rings of processes that are gone are removed once empty (the main process logged
    # nothing, so it has none): the listener's baseline.
    # The listener holds a pidfd for each live process: none is left when their ends are written.
    wait_for(lambda: svc.health()["queue"]["rings"] == 0 and svc.health()["workers"]["live"] == 0,
             what="the first pool's rings retired and its ends written")
    fds0, threads0, rss0 = _listener_resources(svc)
    with ctx.Pool(2, maxtasksperchild=1, **svc.pool_kwargs()) as pool:
        pids = set(pool.map(workers.short_task, range(n), chunksize=1))
    assert svc.flush(60)
    assert len(pids) >= n * 0.9  # really one process per task (a few may be reused by timing)
    wait_for(lambda: svc.health()["queue"]["rings"] == 0 and svc.health()["workers"]["live"] == 0,
             what="the churned rings retired and their ends written")
    fds1, threads1, rss1 = _listener_resources(svc)
    assert (fds1, threads1) == (fds0, threads0)
    assert rss1 - rss0 < 5 * 1024 * 1024
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    assert sorted(m for m in msgs if m.startswith("task ")) == sorted(
        [f"task {i}" for i in range(20)] + [f"task {i}" for i in range(n)])
    assert svc.health()["processes"] >= n


@pytest.fixture
def ro_mount(tmpfs):
    mnt = tmpfs("ro", "1m")

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True, capture_output=True)

    return mnt, remount


def test_read_only_directory_at_start_names_the_path(ro_mount):
    mnt, remount = ro_mount
    remount("ro")
    with pytest.raises(OSError, match=str(mnt)):
        mplog.LogService(mnt).start()
    with pytest.raises(OSError, match=str(mnt / "sub")):
        mplog.LogService(mnt / "sub").start()


def test_directory_made_read_only_during_a_run(tmp_path, capfd):
    """A read-only filesystem mounted over the log directory while the service runs: the
    listener finds its files gone, cannot create new ones (EROFS), reports it and diverts to
    stderr, and flush() says the record is not in the files; when the mount goes away it
    writes to the files again."""
    logs = tmp_path / "logs"
    svc = mplog.LogService(logs, shutdown_timeout=10, degraded_window=2.0)
    with svc:
        log = logging.getLogger("ro")
        log.info("before")
        assert svc.flush(10)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(logs)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        try:
            wait_for(lambda: svc.health()["status"] == "degraded", what="degraded")
            assert "Read-only file system" in svc.health()["last_error"]["message"]
            log.info("while read-only")
            assert svc.flush(10) is False  # it went to stderr, not to the files (issue 30)
            assert "while read-only" in capfd.readouterr().err
        finally:
            subprocess.run(["umount", "-l", str(logs)], capture_output=True)
        log.info("after")
        assert svc.flush(10)
        wait_for(lambda: svc.health()["status"] == "healthy", what="recovery")
    r = svc.health()["records"]
    assert (r["sent"], r["written"], r["diverted"], r["lost"]) == (3, 2, 1, 0)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["before", "after"]


class SlowRepr:
    def __repr__(self):
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:  # a slow __repr__ only slows its own caller
            pass
        return "<slow>"


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def _hostile_extras():
    log = logging.getLogger("hostile2")
    log.info("ten thousand extras", extra={f"k{i}": i for i in range(10_000)})
    log.info("deeply nested", extra={"deep": _nested(100_000)})
    log.info("slow repr", extra={"slow": SlowRepr()})
    log.info("fifty megabytes %s", "m" * (50 * 1024 * 1024))
    log.info("done")


def test_hostile_extras_and_huge_message(service, ctx):
    svc = service()
    with ProcessPoolExecutor(1, mp_context=ctx, **svc.pool_kwargs()) as pool:
        pool.submit(_hostile_extras).result(120)
    assert svc.flush(120)
    blocks = app_blocks(svc.full_path)
    assert [b["message"][:20] for b in blocks] == [
        "ten thousand extras", "deeply nested", "slow repr", "fifty megabytes " + "mmmm", "done"]
    assert len(blocks[0]["context"]) == 10_000 and blocks[0]["context"]["k9999"] == "9999"
    # JSON-shaped values keep 20 levels (typed in jsonl); below that, the repr or its placeholder
    assert "<unprintable list: RecursionError" in blocks[1]["context"]["deep"]
    assert blocks[2]["context"]["slow"] == "<slow>"
    assert len(blocks[3]["message"]) == len("fifty megabytes ") + 50 * 1024 * 1024
    h = svc.health()
    assert h["records"]["replaced"] == 1 and h["records"]["written"] == 5
