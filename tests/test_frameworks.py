"""Frameworks' lifecycles (issue 30): a LOGGING dict applied in every process (Django, Celery
prefork, gunicorn), a child that closes what it inherited, honest flush() and health(), records
logged from atexit functions, and SpoolHandler as a QueueHandler."""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

import mplog
from mplog._common.counters import STATE_RUNNING, STATE_STOPPED, Counters
from mplog._common.transport import K_STOP, FifoWriter

from conftest import app_blocks, simplified_lines, wait_for

import fw_settings

HERE = Path(__file__).resolve().parent
N = 40  # records per worker


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[mplog.ServiceHandler]:
    """The parent applies fw_settings.LOGGING (its ServiceHandler starts the service); the
    handler is closed (the service stopped) after the test."""
    monkeypatch.chdir(tmp_path)
    fw_settings.setup()
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, mplog.ServiceHandler))
    assert handler.service is not None and not handler.joined
    yield handler
    handler.close()
    logging.getLogger().removeHandler(handler)


def _listeners() -> list:
    """Listener processes started by this process or any of its children."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "mplog._listener" in p.cmdline():
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def _stop_and_read(handler: mplog.ServiceHandler, tmp_path: Path) -> list:
    svc = handler.service
    assert svc is not None
    report = svc.stop()
    assert report["status"] == "down"
    text = (tmp_path / "logs" / "run.log").read_text()
    assert text.count("mplog stopped:") == 1, text  # one listener's stop, at the end
    return sorted(str(b["message"]) for b in app_blocks(tmp_path / "logs" / "run.debug.log"))


# -- 1. a child's own configuration detaches that child only -------------------------------------
def test_a_child_that_applies_its_own_logging_detaches_only_itself(settings, ctx, tmp_path, capfd):
    """The child's dictConfig closes the ServiceHandler it inherited (fork): the parent's
    listener, spool and files are untouched, its 100 records reach the full log, flush() and
    health() are true; the child's record goes where its own configuration sends it."""
    svc = settings.service
    pid = svc.health()["listener"]["pid"]
    own = tmp_path / "child.log"
    p = ctx.Process(target=fw_settings.own_config_child, args=(str(own), 5))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    for i in range(100):
        logging.getLogger("fw.parent").info("parent %d", i)
    assert svc.flush(10) is True
    health = svc.health()
    assert health["status"] == "healthy" and health["restarts"] == 0 and health["listener"]["pid"] == pid
    assert own.read_text().splitlines() == [f"INFO fw.worker child item {i}" for i in range(5)]
    assert "listener exited" not in capfd.readouterr().err
    assert _stop_and_read(settings, tmp_path) == sorted(f"parent {i}" for i in range(100))


# -- 2. the same LOGGING dict in every process joins the one service ----------------------------
@pytest.mark.parametrize("kind", ["Pool", "ProcessPoolExecutor", "Process"])
def test_the_same_logging_dict_in_every_worker_joins_the_service(settings, ctx, kind, tmp_path, capfd):
    """Django-style settings applied in the parent and again in each worker (a pool's
    initializer, a Process target): one listener runs, nothing raises, every record of every
    worker reaches the full log once."""
    svc = settings.service
    pid = svc.health()["listener"]["pid"]
    tags = [f"w{k}" for k in range(4)]
    if kind == "Pool":
        with ctx.Pool(2, initializer=fw_settings.setup) as pool:
            pids = pool.map(fw_settings.log_items, [(t, N) for t in tags])
    elif kind == "ProcessPoolExecutor":
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx, initializer=fw_settings.setup) as ex:
            pids = list(ex.map(fw_settings.log_items, [(t, N) for t in tags]))
    else:
        procs = [ctx.Process(target=fw_settings.configured_process, args=(t, N)) for t in tags]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * len(procs)
        pids = [p.pid for p in procs]
    assert os.getpid() not in pids
    logging.getLogger("fw.parent").info("parent done")
    assert svc.flush(10) is True
    assert _listeners() == [pid]
    health = svc.health()
    assert health["status"] == "healthy" and health["restarts"] == 0
    err = capfd.readouterr().err
    assert "EBUSY" not in err and "Errno" not in err and "Traceback" not in err, err
    expected = sorted([f"{t} item {i}" for t in tags for i in range(N)] + ["parent done"])
    assert _stop_and_read(settings, tmp_path) == expected


def test_a_subprocess_that_applies_the_settings_joins_the_service(settings, tmp_path):
    """Django's autoreloader runs the server in a subprocess that calls django.setup() again:
    a new interpreter started from the service's process joins it, starting nothing."""
    code = ("import logging, fw_settings; fw_settings.setup(); "
            "h = logging.getLogger().handlers[0]; assert h.joined and h.service is None, h; "
            "fw_settings.log_items(('sub', 40)); h.flush()")
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr
    assert settings.service.flush(10) is True
    assert _stop_and_read(settings, tmp_path) == sorted(f"sub item {i}" for i in range(40))


def test_a_file_set_held_by_another_program_is_refused_with_what_to_do(tmp_path):
    """Not a child of the service's process: a ServiceHandler on its files raises EBUSY naming
    the files and what to do; it does not join another program's service."""
    script = textwrap.dedent("""
        import sys, mplog
        with mplog.LogService(sys.argv[1]):
            print("ready", flush=True)
            sys.stdin.readline()
    """)
    other = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "logs")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        with pytest.raises(OSError) as info:
            mplog.ServiceHandler(tmp_path / "logs")
        assert info.value.errno == errno.EBUSY
        message = str(info.value)
        assert f"pid {other.pid}" in message and "not a service of this program" in message
        assert "another directory or name" in message and str(tmp_path / "logs" / "run.log") in message
    finally:
        other.stdin.close()
        assert other.wait(60) == 0


# -- 3. flush() and health() never claim what is not true ----------------------------------------
def _stop_from_child(fifo: str) -> None:
    """What a child holding a copy of the service did before: send the listener a stop."""
    writer = FifoWriter(fifo)
    writer.write_frames(K_STOP, b"\0" * 8, time.monotonic() + 5)
    writer.close()


def test_a_listener_stopped_by_a_child_is_a_named_restart(service, ctx):
    """A stop frame from another process: the listener's exit is a restart, counted, named
    after that process in health and on stderr; the service works again, every record in."""
    svc = service()
    p = ctx.Process(target=_stop_from_child, args=(svc.worker_config.fifo_path,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    wait_for(lambda: svc.health()["restarts"] == 1, 30, "the restart")
    health = svc.health()
    assert health["last_exit"]["name"] == "EXIT(0)"
    assert f"stopped by process {p.pid}" in health["last_exit"]["cause"]
    wait_for(lambda: svc.health()["listener"]["status"] == "running", 30, "the new listener")
    for i in range(20):
        logging.getLogger("fw").info("after %d", i)
    assert svc.flush(10) is True
    assert f"stopped by process {p.pid}" in svc.health().get("reason", "")
    report = svc.stop()
    assert report["records"]["diverted"] == 0
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    assert msgs == [f"after {i}" for i in range(20)]


def test_flush_and_health_say_so_while_records_go_to_stderr(service, capfd):
    """The spool's state is stopped under a running service (what a child's stop did): the
    records go to stderr, and flush() returns False, health() is degraded with the reason; once
    the files take records again, flush() is True and health() healthy again."""
    svc = service(degraded_window=2.0)
    assert svc.flush(10) is True
    counters = Counters.open(svc.worker_config.counters_path)
    counters.set("state", STATE_STOPPED)
    for i in range(10):
        logging.getLogger("fw").info("lost %d", i)
    assert svc.flush(10) is False
    health = svc.health()
    assert health["status"] == "degraded" and "10 record(s) went to stderr" in health["reason"]
    assert capfd.readouterr().err.count("lost ") == 10
    counters.set("state", STATE_RUNNING)
    counters.close()
    logging.getLogger("fw").info("written")
    assert svc.flush(10) is True
    wait_for(lambda: svc.health()["status"] == "healthy", 30, "healthy again")
    svc.stop()
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["written"]


# -- 4. atexit like the standard library -----------------------------------------------------
ATEXIT_SCRIPT = """
import atexit, multiprocessing, os, sys

def after_logging_shutdown():
    import logging
    logging.getLogger("app").warning("logged after the stop")

if __name__ == "__main__":
    atexit.register(after_logging_shutdown)  # before logging exists: it runs after logging's shutdown
import logging, logging.config
import mplog

def child():
    logging.getLogger("app").info("from the child")

def main(directory, how, method):
    for i in range(3):
        atexit.register(lambda i=i: logging.getLogger("app").warning("atexit before start %d", i))
    if how == "dictconfig":
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "handlers": {"m": {"class": "mplog.ServiceHandler", "directory": directory}},
                                   "root": {"handlers": ["m"], "level": "INFO"}})
        kwargs = {}
    else:
        kwargs = mplog.LogService(directory).start().pool_kwargs()
    for i in range(3):
        atexit.register(lambda i=i: logging.getLogger("app").warning("atexit after start %d", i))
    # A pool worker whose exit stops nothing (3.13 runs atexit in a fork child too).
    with multiprocessing.get_context(method).Pool(1, initializer=kwargs.get("initializer"),
                                                  initargs=kwargs.get("initargs", ())) as pool:
        pool.apply(child)
    logging.getLogger("app").info("main done")
    # never stopped by hand

if __name__ == "__main__":
    main(*sys.argv[1:4])
"""

_INTERPRETERS = [sys.executable] + [p for p in ("/root/.pyenv/versions/3.13.0/bin/python3.13",)
                                    if os.path.exists(p) and sys.version_info[:2] != (3, 13)]


@pytest.mark.parametrize("python", _INTERPRETERS, ids=lambda p: os.path.basename(p))
@pytest.mark.parametrize("how", ["service", "dictconfig"])
def test_records_of_atexit_functions_are_written_whenever_they_were_registered(tmp_path, how, ctx, python):
    """A program that never stops its service: what atexit functions registered before and
    after start() log is in both files and in the stop report; a record logged after the stop
    goes to stderr as one simplified line. (3.13 runs atexit in a fork child too.)"""
    script = tmp_path / "app.py"
    script.write_text(ATEXIT_SCRIPT)
    proc = subprocess.run([python, "-W", "ignore", str(script), str(tmp_path / "logs"), how,
                           ctx.get_start_method()],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    expected = (["from the child", "main done"] + [f"atexit after start {i}" for i in (2, 1, 0)]
                + [f"atexit before start {i}" for i in (2, 1, 0)])
    assert [b["message"] for b in app_blocks(tmp_path / "logs" / "run.debug.log")] == expected
    simple = simplified_lines(tmp_path / "logs" / "run.log")
    assert [ln.split("] ", 1)[1].replace("WARNING: ", "") for ln in simple[:-1]] == expected
    assert simple[-1].endswith("mplog stopped: 8 records written, 0 dropped, 0 lost; 6 distinct warning(s):")
    assert (tmp_path / "logs" / "run.log").read_text().count("mplog stopped:") == 1
    late = [ln for ln in proc.stderr.splitlines() if "logged after the stop" in ln]
    assert len(late) == 1 and re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] WARNING: logged after the stop",
                                           late[0]), proc.stderr
    assert "logged after the stop" not in (tmp_path / "logs" / "run.debug.log").read_text()


# -- 7. SpoolHandler has QueueHandler's public attributes -------------------------------------------
class _Tagged(mplog.SpoolHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = logging.makeLogRecord(record.__dict__)
        record.msg = "tagged: " + str(record.msg)
        return record


def test_spool_handler_has_queue_handlers_attributes(service):
    """queue, listener (None), prepare, enqueue and emit, as logging.handlers.QueueHandler has
    them (3.12+); a subclass that overrides prepare() has it called for every record."""
    import logging.handlers
    svc = service()
    handler = mplog.SpoolHandler(svc.worker_config)
    public = {n for n in vars(logging.handlers.QueueHandler) if not n.startswith("_")}
    public |= {n for n in vars(logging.handlers.QueueHandler(None)) if not n.startswith("_")}
    assert public <= set(dir(handler)), public - set(dir(handler))
    assert handler.listener is None and isinstance(handler.queue, mplog.ServiceQueue)
    record = logging.makeLogRecord({"name": "fw.q", "msg": "direct %d", "args": (1,), "levelno": logging.INFO,
                                    "levelname": "INFO"})
    assert handler.prepare(record) is record
    handler.enqueue(record)
    tagged = _Tagged(svc.worker_config)
    log = logging.getLogger("fw.q")
    log.propagate = False
    log.addHandler(tagged)
    try:
        log.info("through %s", "emit")
    finally:
        log.removeHandler(tagged)
        log.propagate = True
    svc.stop()
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["direct 1", "tagged: through emit"]
