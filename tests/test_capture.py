"""Pools made without the initializer log to a running service (issue 13): joblib and loky,
Dask's processes scheduler, multiprocessing under spawn and forkserver, nested pools; scoped to
the service's life; off by option and by environment; loud about workers it cannot reach.

Every test uses the real library, checks each record exactly once with the worker's pid in its
header, and leaves no worker behind (loky's reusable executor is shut down after each test).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import mplog
import workers
from conftest import START_METHODS, app_blocks, read_blocks

joblib = pytest.importorskip("joblib", reason="the capture tests use joblib: pip install -e '.[test]'")
from joblib.externals import loky  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SPAWNING = [m for m in ("spawn", "forkserver") if m in START_METHODS]
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _no_loky_left() -> Iterator[None]:
    """loky keeps its workers for the next call: stop them after each test, so none outlives it."""
    yield
    workers.shutdown_loky()


def _check(svc: "mplog.LogService", pids: Dict[str, int]) -> List[Dict[str, object]]:
    """Every tag's record is in the full log exactly once, from the pid of the worker that ran it
    (not the main process's)."""
    assert svc.flush(30)
    blocks = [b for b in app_blocks(svc.full_path) if str(b["message"]).startswith("capture ")]
    seen: Dict[str, List[int]] = {}
    for b in blocks:
        seen.setdefault(str(b["message"])[len("capture "):], []).append(int(b["pid"]))  # type: ignore[arg-type]
    assert sorted(seen) == sorted(pids), f"records {sorted(seen)} != tags {sorted(pids)}"
    for tag, pid in pids.items():
        assert seen[tag] == [pid], f"{tag}: written from {seen[tag]}, logged in {pid}"
        assert pid != os.getpid()
    return blocks


def _tags(prefix: str, n: int) -> List[str]:
    return [f"{prefix}-{i}" for i in range(n)]


# -- joblib and loky ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, "loky"])
def test_joblib_parallel_workers_log_to_the_service(service, backend):
    """joblib.Parallel with its default backend, and with backend="loky", made with no mplog
    code: every record reaches the full log once, from its loky worker."""
    svc = service()
    tags = _tags(f"joblib-{backend}", 12)
    kw = {} if backend is None else {"backend": backend}
    pids = joblib.Parallel(n_jobs=2, **kw)(joblib.delayed(workers.log_tagged)(t) for t in tags)
    _check(svc, dict(zip(tags, pids)))


@pytest.mark.parametrize("context", ["loky", "loky_init_main"] + SPAWNING)
def test_loky_reusable_executor_workers_log_to_the_service(service, context):
    """loky.get_reusable_executor() under each start method loky offers (fork aside, which
    inherits the handler): every record once, from its worker."""
    svc = service()
    tags = _tags(f"loky-{context}", 8)
    executor = loky.get_reusable_executor(1, context=context)
    pids = list(executor.map(workers.log_tagged, tags))
    _check(svc, dict(zip(tags, pids)))


def test_nested_joblib_inside_a_joblib_worker(service):
    """A loky Parallel started inside a joblib worker: the grandchildren's records arrive once."""
    svc = service()
    outer = ["nest-0", "nest-1"]
    inner = joblib.Parallel(n_jobs=2)(joblib.delayed(workers.nested_joblib)(t) for t in outer)
    pids = {f"{t}-{i}": pid for t, got in zip(outer, inner) for i, pid in enumerate(got)}
    _check(svc, pids)


# -- Dask ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", START_METHODS)
def test_dask_processes_scheduler_workers_log_to_the_service(service, method):
    """dask.compute(..., scheduler="processes") under each start method (Dask's
    ``multiprocessing.context``): every record once, from its worker."""
    dask = pytest.importorskip("dask")
    svc = service()
    tags = _tags(f"dask-{method}", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads
        with dask.config.set({"multiprocessing.context": method}):
            pids = dask.compute(*[dask.delayed(workers.log_tagged)(t) for t in tags],
                                scheduler="processes", num_workers=2)
    _check(svc, dict(zip(tags, pids)))


# -- multiprocessing without the initializer ----------------------------------------------------
@pytest.mark.parametrize("method", SPAWNING)
def test_multiprocessing_pools_and_processes_without_the_initializer(service, method):
    """Under spawn and forkserver, a Pool, a ProcessPoolExecutor and a plain Process made
    without mplog's initializer or worker_init: every record once, from its worker."""
    svc = service()
    ctx = multiprocessing.get_context(method)
    pids: Dict[str, int] = {}
    tags = _tags(f"pool-{method}", 6)
    with ctx.Pool(1) as pool:
        pids.update(zip(tags, pool.map(workers.log_tagged, tags)))
    tags = _tags(f"ppe-{method}", 6)
    with ProcessPoolExecutor(1, mp_context=ctx) as ppe:
        pids.update(zip(tags, ppe.map(workers.log_tagged, tags)))
    p = ctx.Process(target=workers.log_tagged, args=(f"process-{method}",))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    pids[f"process-{method}"] = p.pid  # type: ignore[assignment]
    _check(svc, pids)


@pytest.mark.skipif("forkserver" not in START_METHODS, reason="no forkserver here")
def test_a_forkserver_started_before_the_service(service):
    """The forkserver process outlives services and may predate this one, with an environment
    that knows nothing of it: its children still log to the service, because the config travels
    in what each child unpickles first."""
    import psutil
    from multiprocessing import forkserver
    forkserver._forkserver._stop()  # a fresh server, started now, before the service
    forkserver.ensure_running()
    server = psutil.Process(forkserver._forkserver._forkserver_pid)
    assert "MPLOG_CAPTURE" not in server.environ()
    svc = service()
    tags = _tags("early-server", 6)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as ppe:
        pids = dict(zip(tags, ppe.map(workers.log_tagged, tags)))
    _check(svc, pids)


@pytest.mark.parametrize("outer,inner", [("spawn", "forkserver"), ("forkserver", "spawn")])
def test_nested_executors_without_the_initializer(service, outer, inner):
    """A ProcessPoolExecutor started inside another's worker, neither with the initializer: the
    grandchildren's records arrive once, with their own pids."""
    if outer not in START_METHODS or inner not in START_METHODS:
        pytest.skip(f"{outer} or {inner} is not available here")
    svc = service()
    outer_tags = [f"nest-{outer}-0", f"nest-{outer}-1"]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(outer)) as ppe:
        got = list(ppe.map(workers.nested_executor, [(inner, t) for t in outer_tags]))
    pids = {f"{t}-{i}": pid for t, ps in zip(outer_tags, got) for i, pid in enumerate(ps)}
    _check(svc, pids)


# -- scope --------------------------------------------------------------------------------------
def _capture_dirs() -> List[str]:
    from mplog._common.spool import spool_root
    return [e for e in os.listdir(spool_root()) if e.startswith(f"mplog-children-{os.getuid()}-{os.getpid()}-")]


def test_nothing_is_left_once_the_service_stops(tmp_path):
    """While the service runs: MPLOG_CAPTURE, a PYTHONPATH entry, the capture directory, the
    multiprocessing wrapper. After stop(): none of them, and PYTHONPATH is exactly as before."""
    import multiprocessing.spawn as spawn
    before_env = {k: os.environ.get(k) for k in ("PYTHONPATH", "MPLOG_CAPTURE")}
    before_gpd = spawn.get_preparation_data
    with mplog.LogService(tmp_path / "logs") as svc:
        assert os.environ["MPLOG_CAPTURE"].startswith(f"{os.getpid()}:")
        here = os.environ["MPLOG_CAPTURE"].partition(":")[2]
        assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == here
        assert os.path.isfile(os.path.join(here, "sitecustomize.py"))
        assert spawn.get_preparation_data is not before_gpd
        svc.flush()
    assert {k: os.environ.get(k) for k in ("PYTHONPATH", "MPLOG_CAPTURE")} == before_env
    assert spawn.get_preparation_data is before_gpd
    assert not os.path.exists(here)
    assert _capture_dirs() == []


def test_a_reused_worker_logs_nowhere_between_services_and_follows_the_next(tmp_path):
    """loky keeps its workers across services. A worker captured by the first service logs
    after that service stopped as if mplog were not there (lastResort), not into the old files;
    under a second service of the same process, the same worker's records arrive there once."""
    # loky's workers exit after `timeout` idle seconds (10 by default); a slow machine must not
    # replace one between the services: this test is about a worker the first service captured.
    executor = loky.get_reusable_executor(2, timeout=300)
    with mplog.LogService(tmp_path / "one") as first:
        tags = _tags("first", 6)
        pids1 = dict(zip(tags, executor.map(workers.log_tagged, tags)))
        _check(first, pids1)
        started_in_first = set(executor._processes)  # every worker of the executor, busy or not
    first_text = first.full_path.read_text()
    assert loky.get_reusable_executor(2, timeout=300) is executor  # the same workers, reused
    between_tags = _tags("between", 4)
    between = list(executor.map(workers.log_past_the_service, between_tags))
    for tag, (pid, reached_last_resort, handlers) in zip(between_tags, between):
        assert pid in started_in_first
        assert reached_last_resort == [f"capture {tag}"]  # where logging puts it with no handler
        assert handlers == ["CapturedHandler"]  # still there, inert
    assert first.full_path.read_text() == first_text  # nothing more went to the stopped service
    with mplog.LogService(tmp_path / "two") as second:
        assert loky.get_reusable_executor(2, timeout=300) is executor
        tags = _tags("second", 6)
        pids2 = dict(zip(tags, executor.map(workers.log_tagged, tags)))
        assert set(pids2.values()) <= started_in_first  # no new worker: the old ones followed
        _check(second, pids2)
    assert first.full_path.read_text() == first_text


def test_another_programs_pool_is_not_captured(service):
    """A Python program run with subprocess while the service runs inherits the environment,
    but neither it nor its own pool's workers are captured: they are not this run's workers."""
    svc = service()
    code = ("import sys, multiprocessing as mp; sys.path.insert(0, sys.argv[1]); import workers\n"
            "if __name__ == '__main__':\n"
            "    with mp.get_context('spawn').Pool(1) as pool:\n"
            "        print(workers.child_state(0)[1], pool.map(workers.child_state, [0])[0][1])\n"
            "        pool.map(workers.log_tagged, ['foreign'])\n")
    script = Path(svc.config.directory) / "other.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script), TESTS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"  # no handler in the program, none in its worker
    assert svc.flush(10)
    assert not [b for b in app_blocks(svc.full_path) if b["message"] == "capture foreign"]


# -- turning it off -----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["option", "environment"])
def test_capture_turned_off(service, monkeypatch, how):
    """capture_children=False, or MPLOG_CAPTURE_CHILDREN=0: nothing is published, and a spawn
    worker made without the initializer has no handler (as before issue 13)."""
    if how == "environment":
        monkeypatch.setenv("MPLOG_CAPTURE_CHILDREN", "0")
        svc = service()
    else:
        svc = service(capture_children=False)
    assert "MPLOG_CAPTURE" not in os.environ
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pid, handlers, capture, _ = pool.map(workers.child_state, [0])[0]
        pool.map(workers.log_tagged, ["off"])
    assert handlers == [] and capture is None
    assert svc.flush(10)
    assert not [b for b in app_blocks(svc.full_path) if b["message"] == "capture off"]


def test_capture_children_option_is_validated(tmp_path):
    """capture_children takes True or False; anything else names the option."""
    with pytest.raises(ValueError, match="capture_children"):
        mplog.LogService(tmp_path, capture_children="yes")


# -- chaining and loudness ----------------------------------------------------------------------
def test_an_existing_sitecustomize_still_runs(service, tmp_path, monkeypatch):
    """A sitecustomize of the user's on PYTHONPATH still runs in a captured worker, and
    PYTHONPATH is exactly the user's again after the stop."""
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['MPLOG_TEST_CHAINED'] = 'yes'\n")
    monkeypatch.setenv("PYTHONPATH", str(own))
    svc = service()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pid, handlers, capture, chained = pool.map(workers.child_state, [0])[0]
        log_pid = pool.map(workers.log_tagged, ["chained"])[0]
    assert chained == "yes"
    assert handlers == ["CapturedHandler"] and capture == f"{pid}:{capture.partition(':')[2]}"
    _check(svc, {"chained": log_pid})
    svc.stop()
    assert os.environ["PYTHONPATH"] == str(own)


def test_workers_started_before_the_service_are_named_in_a_notice(service):
    """Workers that predate the service cannot be reached: the service says so in its log,
    naming their pids, instead of losing their records silently."""
    executor = loky.get_reusable_executor(2, timeout=300)  # none exits idle before the check
    early = set(executor.map(workers.log_tagged, _tags("early", 4)))
    svc = service()
    assert svc.flush(10)
    notices = [b for b in read_blocks(svc.full_path) if b["logger"] == "mplog" and b["level"] == "WARNING"]
    assert len(notices) == 1, notices
    text = str(notices[0]["message"])
    assert "started before this service cannot log to it" in text
    for pid in early:
        assert f"{pid} (loky worker)" in text
