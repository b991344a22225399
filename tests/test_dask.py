"""Dask distributed integration (mplog.dask): a real LocalCluster with worker processes."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Tuple

import pytest

distributed = pytest.importorskip(
    "distributed", reason="mplog.dask needs the 'distributed' package: pip install 'mplog[dask]'")

import mplog.dask  # noqa: E402
from conftest import app_blocks, read_blocks, wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(180)

N_WORKERS = 3


# -- what the tasks run in the worker processes (pickled by reference: this module) -----------
def log_records(tag: str, n: int) -> Tuple[str, int]:
    log = logging.getLogger("t.dask")
    for i in range(n):
        level = logging.INFO if i % 2 == 0 else logging.DEBUG
        log.log(level, "%s item %d", tag, i, extra={"tag": tag, "item": i})
    worker = distributed.get_worker()
    return worker.address, os.getpid()


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def log_awkward(tag: str) -> Tuple[str, int]:
    log = logging.getLogger("t.awkward")
    try:
        raise ValueError("bad input")
    except ValueError:
        log.exception("%s failed", tag)
    log.info("%s %d", tag, "not a number")                       # formatting fails: placeholder
    log.info("%s unprintable", tag, extra={"thing": _Unprintable()})
    log.info("%s line one\nline two \udc80 end", tag)            # newline and a lone surrogate
    log.warning("%s for the user", tag, extra={"is_user_message": True})
    log.info("%s own address", tag, extra={"dask_worker": "forged"})
    with mplog.context(stage="align"):
        log.info("%s in context", tag)
    return distributed.get_worker().address, os.getpid()


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def dask_client() -> Iterator[Any]:
    """A LocalCluster of worker processes and its client; both closed, and every worker
    process gone, at teardown (the autouse fixture checks that no child is left)."""
    cluster = distributed.LocalCluster(n_workers=N_WORKERS, processes=True, threads_per_worker=1,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close(timeout=30)
        cluster.close(timeout=30)


def _run_on_each(client: Any, fn: Any, *args: Any, tasks_per_worker: int = 1,
                 prefix: str = "") -> List[Tuple[str, Tuple[str, int]]]:
    """Run ``fn(tag, *args)`` pinned to each worker; returns [(tag, (address, pid))]."""
    futures = []
    for w, address in enumerate(sorted(client.scheduler_info()["workers"])):
        for t in range(tasks_per_worker):
            tag = f"{prefix}w{w}t{t}-{address.rsplit(':', 1)[-1]}"
            futures.append((tag, client.submit(fn, tag, *args, workers=[address], allow_other_workers=False,
                                               pure=False)))
    return [(tag, f.result(timeout=60)) for tag, f in futures]


def _check_round(blocks: List[Dict[str, Any]], results: List[Tuple[str, Tuple[str, int]]], n: int) -> None:
    """Every record of every task exactly once, from the worker that ran it, in order."""
    by_tag: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for b in blocks:
        tag = b["context"].get("tag")
        if tag is not None:
            by_tag[tag].append(b)
    for tag, (address, pid) in results:
        mine = by_tag[tag]
        assert [b["message"] for b in mine] == [f"{tag} item {i}" for i in range(n)], tag
        for i, b in enumerate(mine):
            assert b["context"]["dask_worker"] == address
            assert b["context"]["item"] == str(i)
            assert b["pid"] == pid
            assert b["process"].startswith("Dask Worker process")
            assert b["level"] == ("INFO" if i % 2 == 0 else "DEBUG")
            assert b["logger"] == "t.dask"


def _per_process_order(blocks: List[Dict[str, Any]]) -> None:
    """A worker runs one task at a time: per process, each task's records are contiguous."""
    tags_by_pid: Dict[int, List[str]] = defaultdict(list)
    for b in blocks:
        tag = b["context"].get("tag")
        if tag is not None and (not tags_by_pid[b["pid"]] or tags_by_pid[b["pid"]][-1] != tag):
            tags_by_pid[b["pid"]].append(tag)
    for pid, tags in tags_by_pid.items():
        assert len(tags) == len(set(tags)), f"records of process {pid} interleaved: {tags}"


# -- tests ------------------------------------------------------------------------------------
def test_flattened_record_is_plain_json_and_rebuilds():
    """What a worker sends is JSON-able plain data (msgpack-safe: no lone surrogate), and the
    client's checks accept it and rebuild the same record."""
    import json

    try:
        raise KeyError("k")
    except KeyError:
        record = logging.getLogger("t.flat").makeRecord(
            "t.flat", logging.WARNING, "/x/y.py", 7, "a %s \udc80", ("b",), sys.exc_info(), "fn",
            {"n": 1, "bad": _Unprintable(), "dask_worker": "mine"})
    flat, failures, _size = mplog.dask.flatten_record(record)
    assert failures == 1
    text = json.dumps(flat, allow_nan=False)
    assert json.loads(text) == flat
    text.encode("utf-8")  # strict: would fail on a lone surrogate
    rebuilt = mplog.dask._rebuild(json.loads(text), "tcp://w:1")
    assert rebuilt.getMessage() == "a b \\udc80"
    assert rebuilt.levelno == logging.WARNING and rebuilt.name == "t.flat" and rebuilt.lineno == 7
    assert rebuilt.exc_text.endswith("KeyError: 'k'") and rebuilt.exc_info is None
    assert (rebuilt.n, rebuilt.dask_worker, rebuilt.dask_worker_extra) == ("1", "tcp://w:1", "mine")
    assert rebuilt.bad.startswith("<unprintable _Unprintable")


def test_records_from_every_worker_once_in_order(service, dask_client):
    svc = service()
    client = dask_client
    n = 150
    with mplog.dask.forward_dask_logs(client, svc) as fwd:
        results = _run_on_each(client, log_records, n, tasks_per_worker=2)
        assert fwd.flush(30)
        counts = fwd.counts
    assert len({address for _, (address, _) in results}) == N_WORKERS
    blocks = app_blocks(svc.full_path)
    _check_round(blocks, results, n)
    _per_process_order(blocks)
    total = N_WORKERS * 2 * n
    assert counts["received"] == total
    assert counts["dropped_in_workers"] == counts["malformed"] == counts["missing_batches"] == 0
    assert counts["workers_ended_without_final"] == 0
    assert len([b for b in blocks if "tag" in b["context"]]) == total
    assert svc.health()["records"]["dropped"] == 0


def test_worker_killed_and_replaced_by_its_nanny(service, dask_client):
    svc = service()
    client = dask_client
    n = 40
    with mplog.dask.forward_dask_logs(client, svc) as fwd:
        first = _run_on_each(client, log_records, n, prefix="before-")
        assert fwd.flush(30)
        pids = client.run(os.getpid)
        victim, victim_pid = sorted(pids.items())[0]
        os.kill(victim_pid, signal.SIGKILL)

        def replaced() -> bool:
            workers = client.scheduler_info()["workers"]
            return victim not in workers and len(workers) == N_WORKERS

        wait_for(replaced, 60, "the nanny to replace the killed worker")
        new_pids = client.run(os.getpid)
        (newcomer,) = set(new_pids) - set(pids)
        assert new_pids[newcomer] != victim_pid
        second = _run_on_each(client, log_records, n, prefix="after-")
        assert fwd.flush(30)
        counts = fwd.counts
    assert {address for _, (address, _) in second} == set(new_pids)
    blocks = app_blocks(svc.full_path)
    _check_round(blocks, first + second, n)
    _per_process_order(blocks)
    assert any(address == newcomer and pid == new_pids[newcomer] for _, (address, pid) in second)
    assert counts["received"] == 2 * N_WORKERS * n
    # The killed worker never sent a final batch: detected, counted and reported once.
    assert counts["workers_ended_without_final"] == 1
    notices = [b for b in blocks if b["logger"] == "mplog.dask"]
    assert len(notices) == 1
    assert notices[0]["message"].startswith(f"Dask worker {victim} ended without its final log batch")
    assert notices[0]["context"]["dask_worker"] == victim


def test_awkward_records_arrive_as_text(service, dask_client):
    svc = service()
    client = dask_client
    with mplog.dask.forward_dask_logs(client, svc) as fwd:
        address, pid = client.submit(log_awkward, "odd", pure=False).result(timeout=60)
        assert fwd.flush(30)
        counts = fwd.counts
    blocks = [b for b in app_blocks(svc.full_path) if b["logger"] == "t.awkward"]
    assert all(b["context"]["dask_worker"] == address and b["pid"] == pid for b in blocks)
    by_start = {b["message"].split("\n")[0]: b for b in blocks}
    failed = by_start["odd failed"]
    assert failed["level"] == "ERROR"
    assert "  Traceback (most recent call last):" in failed["lines"]
    assert "  ValueError: bad input" in failed["lines"]
    placeholder = [m for m in by_start if m.startswith("%s %d <formatting failed: TypeError")]
    assert len(placeholder) == 1
    assert by_start["odd unprintable"]["context"]["thing"].startswith("<unprintable _Unprintable: RuntimeError")
    assert by_start["odd line one"]["message"] == "odd line one\nline two \\udc80 end"
    assert by_start["odd own address"]["context"]["dask_worker_extra"] == "forged"
    assert by_start["odd in context"]["context"]["stage"] == "align"
    assert "odd for the user" in svc.simplified_path.read_text()
    assert counts["replaced_in_workers"] == 2
    assert counts["received"] == len(blocks) == 7


def test_malformed_events_become_counted_placeholders(service, dask_client):
    """Anything on the topic that is not a well-formed batch is replaced and counted, never
    written as it came, never unpickled."""
    svc = service()
    client = dask_client
    with mplog.dask.forward_dask_logs(client, svc) as fwd:
        good = {"name": "x", "levelno": 20, "levelname": "INFO", "msg": "ok", "pathname": "p.py", "lineno": 1,
                "funcName": "f", "processName": "P", "process": 1, "threadName": "T", "created": time.time(),
                "exc_text": None, "stack_info": None, "extras": {}, "user": False}
        batch = {"mplog": 1, "instance": "i" * 32, "seq": 1, "worker": "tcp://fake:1", "dropped": 0, "replaced": 0,
                 "final": False, "records": [good, dict(good, levelno="20"), dict(good, msg="x" * (600 * 1024)),
                                             dict(good, extras={"msg": "forged"}), dict(good, evil=1), 7]}
        client.log_event("mplog", batch)
        client.log_event("mplog", "not a batch")
        client.log_event("mplog", dict(batch, seq="2"))
        wait_for(lambda: fwd.counts["malformed"] >= 7, 30, "the malformed records to be counted")
        assert fwd.flush(30)
        counts = fwd.counts
    assert counts["malformed"] == 7
    assert counts["received"] == 1
    blocks = app_blocks(svc.full_path)
    assert [b["message"] for b in blocks if b["logger"] == "x"] == ["ok"]
    notes = [b for b in blocks if b["logger"] == "mplog.dask"]
    malformed = [b for b in notes if b["message"].startswith("malformed log record(s) from")]
    assert len(malformed) == 7
    assert all(b["level"] == "WARNING" and len(b["message"]) < 1000 for b in malformed)
    # The forged sender is not a live worker and sent no final batch: reported like a killed one.
    assert [b["message"] for b in notes if b not in malformed] == [
        "Dask worker tcp://fake:1 ended without its final log batch (killed?): records it logged in its "
        "last 0.1 s may be lost, uncounted"]
    assert counts["workers_ended_without_final"] == 1


def test_full_worker_buffer_drops_and_counts(service, dask_client):
    """A worker that cannot send fast enough drops records, never blocks a task, and says how
    many in its next batch."""
    svc = service()
    client = dask_client
    with mplog.dask.forward_dask_logs(client, svc, max_buffer=20, interval=60) as fwd:
        address, _ = client.submit(log_records, "burst", 100, pure=False).result(timeout=60)
        assert fwd.flush(30)
        counts = fwd.counts
    assert counts["received"] == 20
    assert counts["dropped_in_workers"] == 80
    blocks = app_blocks(svc.full_path)
    assert [b["message"] for b in blocks if b["logger"] == "t.dask"] == [f"burst item {i}" for i in range(20)]
    notes = [b["message"] for b in blocks if b["logger"] == "mplog.dask"]
    assert notes == [f"80 record(s) dropped in Dask worker {address}: its buffer of 20 records was full"]


def test_close_sends_what_is_left_and_restores_workers(service, dask_client):
    """close() unregisters the plugin: each worker sends its buffer in a final batch, removes its
    handler and puts its root level back."""
    svc = service()
    client = dask_client
    before = client.run(lambda: (logging.getLogger().level, len(logging.getLogger().handlers)))
    fwd = mplog.dask.forward_dask_logs(client, svc, interval=60)
    results = _run_on_each(client, log_records, 10)
    counts = fwd.close()
    assert fwd.close() == counts  # idempotent
    assert counts["received"] == N_WORKERS * 10
    assert counts["workers_ended_without_final"] == 0
    assert client.run(lambda: (logging.getLogger().level, len(logging.getLogger().handlers))) == before
    assert svc.flush(30)
    _check_round(app_blocks(svc.full_path), results, 10)
    assert not [b for b in read_blocks(svc.full_path) if b["logger"] == "mplog.dask"]
