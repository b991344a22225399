"""mplog inside the user's existing logging: the queue, handlers, formatters, levels, dictConfig,
one service per file set, flush, captureWarnings, inherited handlers, typed JSON, rotation
bursts, the exit hook and non-daemon children (issue 11's regressions, each a test)."""

from __future__ import annotations

import json
import logging
import logging.config
import logging.handlers
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

import mplog
from mplog._listener.files import rotated_files
from conftest import app_blocks, wait_for

import workers

HERE = Path(__file__).parent


def _run(tmp_path: Path, body: str, *args: str, timeout: float = 90):
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(tmp_path))


# -- the queue --------------------------------------------------------------------------------
def test_queue_handler_on_the_root_beside_mplogs_handler_writes_once(service, ctx):
    """QueueHandler(svc.queue) on a root that already has mplog's handler (the main process;
    a forked worker inherits both): every record once, in either handler order."""
    svc = service()
    root = logging.getLogger()
    qh = logging.handlers.QueueHandler(svc.queue)
    root.addHandler(qh)
    try:
        logging.getLogger("q").info("main %d", 1)
        root.handlers.remove(qh)
        root.handlers.insert(0, qh)  # the QueueHandler first: it copies the record
        logging.getLogger("q").info("main %d", 2)
        if ctx.get_start_method() == "fork":
            p = ctx.Process(target=workers.log_n, args=(("forked", 5),))
            p.start()
            p.join(30)
            assert p.exitcode == 0
    finally:
        root.removeHandler(qh)
    assert svc.flush(10)
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    want = ["main 1", "main 2"] + ([f"forked item {i}" for i in range(5)] if ctx.get_start_method() == "fork" else [])
    assert sorted(msgs) == sorted(want)


def test_queue_pickles_into_children_as_a_task_argument(service, ctx):
    """The queue travels to a spawn or forkserver child, in initargs or a task argument, and
    records put there arrive."""
    svc = service()
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        pids = list(pool.map(workers.log_through_queue, [(svc.queue, "task", 10)] * 2))
    assert svc.flush(10)
    blocks = app_blocks(svc.full_path)
    assert sorted(b["message"] for b in blocks) == sorted([f"task {i}" for i in range(10)] * 2)
    assert {b["pid"] for b in blocks} == set(pids)


def test_queue_protocol(service):
    """put(item, block, timeout) and put_nowait take records; None (QueueListener's sentinel)
    is a no-op; qsize/empty/full answer from the spool; the consumer methods raise, saying the
    listener process is the consumer; anything but a record is a TypeError at the boundary."""
    svc = service()
    q = svc.queue
    rec = logging.LogRecord("proto", logging.INFO, __file__, 1, "put with %s", ("timeout",), None)
    q.put(rec, True, 1.0)
    q.put_nowait(None)
    q.put_nowait(logging.LogRecord("proto", logging.INFO, __file__, 2, "nowait", None, None))
    assert svc.flush(10)
    assert q.qsize() == 0 and q.empty() and not q.full()
    for method in (q.get, q.get_nowait, q.task_done, q.join):
        with pytest.raises(NotImplementedError, match="listener process"):
            method()
    with pytest.raises(TypeError, match="LogRecord"):
        q.put("not a record")
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["put with timeout", "nowait"]


def test_queue_handler_traceback_stays_out_of_the_simplified_log(service):
    """QueueHandler.prepare merges the traceback into the message; the simplified log gets the
    message line and the summary, the full log the traceback in its place."""
    svc = service()
    log = logging.getLogger("qtb")
    log.propagate = False
    qh = logging.handlers.QueueHandler(svc.queue)
    log.addHandler(qh)
    try:
        try:
            raise KeyError("missing")
        except KeyError:
            log.exception("lookup failed")
    finally:
        log.removeHandler(qh)
        log.propagate = True
    assert svc.flush(10)
    simple = svc.simplified_path.read_text()
    assert "lookup failed" in simple and "Traceback" not in simple
    (block,) = app_blocks(svc.full_path)
    assert block["message"] == "lookup failed"
    assert any("KeyError: 'missing'" in ln for ln in block["lines"])


# dictConfig takes a queue object from 3.12, but 3.12's first releases demanded "handlers" with it
# and took only queue.Queue and multiprocessing.Queue objects (cpython gh-111615, gh-119819):
# 3.12.1 refuses svc.queue, as it refuses a Manager's queue. The fix added this helper.
@pytest.mark.skipif(not hasattr(logging.config, "_is_queue_like_object"),
                    reason="this Python's dictConfig takes no queue-like object but queue.Queue "
                           "and multiprocessing.Queue (fixed in 3.13 and later 3.12 releases: cpython gh-119819)")
def test_dictconfig_accepts_the_queue(service):
    svc = service()
    logging.config.dictConfig({
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"q": {"class": "logging.handlers.QueueHandler", "queue": svc.queue}},
        "loggers": {"dq": {"handlers": ["q"], "level": "INFO", "propagate": False}},
    })
    try:
        logging.getLogger("dq").info("through dictConfig's queue")
    finally:
        for h in list(logging.getLogger("dq").handlers):
            logging.getLogger("dq").removeHandler(h)
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["through dictConfig's queue"]


def test_spool_handler_in_dictconfig_and_the_deprecated_name(service):
    """The worker's handler declared in dictConfig with its config; MPQueueHandler still works
    and warns."""
    svc = service()
    cfg = svc.worker_config.to_json()
    logging.config.dictConfig({
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"s": {"()": "mplog.SpoolHandler", "config": cfg}},
        "loggers": {"ds": {"handlers": ["s"], "level": "INFO", "propagate": False}},
    })
    try:
        logging.getLogger("ds").info("declared")
    finally:
        for h in list(logging.getLogger("ds").handlers):
            logging.getLogger("ds").removeHandler(h)
    with pytest.warns(DeprecationWarning, match="SpoolHandler"):
        old = mplog.MPQueueHandler(svc.worker_config)
    assert isinstance(old, mplog.SpoolHandler) and isinstance(old, logging.Handler)
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["declared"]


# -- formatters and levels --------------------------------------------------------------------
def test_a_formatter_on_mplogs_handler_renders_the_message(service):
    svc = service()
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, mplog.SpoolHandler))
    handler.setFormatter(logging.Formatter("<%(name)s> %(message)s"))
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("fmt").exception("with %s", "formatter")
    finally:
        handler.setFormatter(None)
    assert svc.flush(10)
    (block,) = app_blocks(svc.full_path)
    assert block["message"] == "<fmt> with formatter"  # the traceback is not repeated in it
    assert sum("ValueError: boom" in ln for ln in block["lines"]) == 1


def test_structlog_processor_formatter_renders(service):
    structlog = pytest.importorskip("structlog")
    svc = service()
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, mplog.SpoolHandler))
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.KeyValueRenderer(key_order=["event", "level"]),
        foreign_pre_chain=[structlog.stdlib.add_log_level]))
    try:
        logging.getLogger("sl").info("plain stdlib", extra={"user": "ada"})
    finally:
        handler.setFormatter(None)
    assert svc.flush(10)
    (block,) = app_blocks(svc.full_path)
    assert block["message"] == "event='plain stdlib' level='info'"


def test_thread_and_relative_created_are_the_logging_processs(service, ctx):
    svc = service(simplified_format="%(process)d %(thread)d %(relativeCreated)d %(message)s")
    with ProcessPoolExecutor(1, mp_context=ctx, **svc.pool_kwargs()) as pool:
        pid, thread, rel = pool.submit(workers.log_thread_and_age, "ids").result(60)
    assert svc.flush(10)
    line = next(ln for ln in svc.simplified_path.read_text().splitlines() if ln.endswith(" ids"))
    got_pid, got_thread, got_rel, _ = line.split(" ", 3)
    assert (int(got_pid), int(got_thread)) == (pid, thread)
    assert abs(int(got_rel) - rel) <= 1


def test_the_users_console_prints_what_it_printed_before(tmp_path, capfd):
    """basicConfig(level=INFO), then start(): the console still prints INFO and above only,
    while the full log gets DEBUG."""
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    try:
        with mplog.LogService(tmp_path / "logs") as svc:
            logging.getLogger("urllib3").debug("third-party chatter")
            logging.getLogger("app").info("for the console")
            assert svc.flush(10)
        assert console.level == logging.NOTSET  # given back as it was
    finally:
        root.removeHandler(console)
    err = capfd.readouterr().err
    assert "for the console" in err and "third-party chatter" not in err
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["third-party chatter", "for the console"]


def test_logger_levels_set_in_main_reach_every_worker(service, ctx):
    svc = service()
    noisy = logging.getLogger("t.levels")
    noisy.setLevel(logging.WARNING)
    try:
        with ctx.Pool(1, **svc.pool_kwargs()) as pool:
            pool.map(workers.log_levels, ["lv"])
    finally:
        noisy.setLevel(logging.NOTSET)
    assert svc.flush(10)
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    assert msgs == ["lv warning"]


# -- lifecycle --------------------------------------------------------------------------------
def test_a_second_service_on_the_same_files_is_refused(service, tmp_path):
    svc = service()
    other = mplog.LogService(tmp_path / "logs")
    with pytest.raises(OSError, match="another mplog service") as info:
        other.start()
    assert str(svc.simplified_path) in str(info.value) and str(os.getpid()) in str(info.value)
    svc.stop()
    with mplog.LogService(tmp_path / "logs") as again:  # free once the first one stopped
        assert again.health()["status"] == "healthy"


def test_configuration_applied_twice_keeps_one_service_and_close_releases_it(tmp_path):
    config = {"version": 1, "disable_existing_loggers": False,
              "handlers": {"m": {"class": "mplog.ServiceHandler", "directory": str(tmp_path / "logs")}},
              "root": {"handlers": ["m"], "level": "DEBUG"}}
    logging.config.dictConfig(config)
    first = next(h for h in logging.getLogger().handlers if isinstance(h, mplog.ServiceHandler))
    logging.getLogger("twice").info("one")
    logging.config.dictConfig(config)  # closes the first handler (its service stops), makes another
    second = next(h for h in logging.getLogger().handlers if isinstance(h, mplog.ServiceHandler))
    assert first.service._stopped and second.service is not first.service
    logging.getLogger("twice").info("two")
    twin = mplog.ServiceHandler(tmp_path / "logs")  # the same file set again in this process
    assert twin.service is second.service
    twin.close()
    assert not second.service._stopped  # one left
    second.close()
    assert second.service._stopped
    logging.getLogger().removeHandler(second)
    assert [b["message"] for b in app_blocks(tmp_path / "logs" / "run.debug.log")] == ["one", "two"]


DICTCONFIG_AT_MODULE_LEVEL = """
import logging, logging.config, multiprocessing, os, sys
logging.config.dictConfig({
    "version": 1, "disable_existing_loggers": False,
    "handlers": {"m": {"class": "mplog.ServiceHandler", "directory": "logs"}},
    "root": {"handlers": ["m"], "level": "INFO"},
})
import workers

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    with ctx.Pool(2) as pool:
        pool.map(workers.log_n, [("mod%d" % k, 20) for k in range(2)])
    logging.getLogger("app").info("done")
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_dictconfig_at_module_level_under_spawn_runs_one_service(tmp_path, method):
    """A spawn child re-imports the main module and with it the configuration: it joins the
    running service instead of starting one on the same files; every record arrives once."""
    proc = _run(tmp_path, DICTCONFIG_AT_MODULE_LEVEL, method)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "logs" / "run.log").read_text()
    assert text.count("mplog stopped:") == 1
    msgs = [b["message"] for b in app_blocks(tmp_path / "logs" / "run.debug.log")]
    assert sorted(msgs) == sorted([f"mod{k} item {i}" for k in range(2) for i in range(20)] + ["done"])


def test_handler_flush_and_logging_shutdown_mean_written(tmp_path):
    """After handler.flush() (and after logging.shutdown()), every record logged before it is
    in the files."""
    body = """
    import logging, sys
    import mplog
    handler = mplog.ServiceHandler(sys.argv[1])
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    for i in range(20):
        logging.getLogger("f").info("flushed %d", i)
    handler.flush()
    with open(sys.argv[1] + "/run.debug.log") as f:
        print("AFTER FLUSH", f.read().count("Message: flushed "))
    for i in range(20):
        logging.getLogger("f").info("shut %d", i)
    logging.shutdown()
    with open(sys.argv[1] + "/run.debug.log") as f:
        print("AFTER SHUTDOWN", f.read().count("Message: shut "))
    """
    proc = _run(tmp_path, body, str(tmp_path / "logs"))
    assert proc.returncode == 0, proc.stderr
    assert "AFTER FLUSH 20" in proc.stdout and "AFTER SHUTDOWN 20" in proc.stdout


def test_stop_keeps_the_users_capture_warnings(tmp_path):
    logging.captureWarnings(True)
    try:
        with mplog.LogService(tmp_path / "logs"):
            pass
        assert getattr(logging, "_warnings_showwarning", None) is not None  # still captured
    finally:
        logging.captureWarnings(False)
    with mplog.LogService(tmp_path / "logs2"):
        assert getattr(logging, "_warnings_showwarning", None) is not None  # ours, while it runs
    assert getattr(logging, "_warnings_showwarning", None) is None  # and off again: we set it


@pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(), reason="needs fork")
def test_a_non_root_file_handler_inherited_by_fork_writes_nothing_from_workers(service, tmp_path):
    import multiprocessing
    stray = tmp_path / "lib.log"
    lib = logging.getLogger("t.worker")
    fh = logging.FileHandler(stray)
    lib.addHandler(fh)
    lib.setLevel(logging.INFO)
    try:
        lib.info("parent line")
        svc = service()
        with multiprocessing.get_context("fork").Pool(2, **svc.pool_kwargs()) as pool:
            pool.map(workers.log_n, [("w", 10)] * 2)
        assert svc.flush(10)
    finally:
        lib.removeHandler(fh)
        lib.setLevel(logging.NOTSET)
        fh.close()
    assert stray.read_text() == "parent line\n"  # no worker line, and the buffer not duplicated
    # (3.12+ also logs fork()'s DeprecationWarning about threads, through captureWarnings)
    assert len([b for b in app_blocks(svc.full_path) if b["logger"] == "t.worker"]) == 20


NON_DAEMON = """
import logging, multiprocessing, sys, time
EARLY
import mplog

def child(config):
    mplog.worker_init(config)
    for i in range(300):
        logging.getLogger("late").info("late %d", i)
        time.sleep(0.002)  # pacing: the child still logs while the parent stops the service

if __name__ == "__main__":
    svc = mplog.LogService(sys.argv[1]).start()
    LATE
    p = multiprocessing.get_context("spawn").Process(target=child, args=(svc.worker_config,))
    p.start()
    # main returns without joining: Python waits for the child, and so must the logs
"""


@pytest.mark.parametrize("order", ["util imported before start()", "util imported after start()"])
def test_exit_waits_for_non_daemon_children_whatever_the_import_order(tmp_path, order):
    early = order.endswith("before start()")
    body = NON_DAEMON.replace("EARLY", "import multiprocessing.util" if early else "").replace(
        "LATE", "" if early else "import multiprocessing.util")
    proc = _run(tmp_path, body, str(tmp_path / "logs"))
    assert proc.returncode == 0, proc.stderr
    msgs = [b["message"] for b in app_blocks(tmp_path / "logs" / "run.debug.log")]
    assert msgs == [f"late {i}" for i in range(300)]
    assert "late " not in proc.stderr


# -- files and formats ------------------------------------------------------------------------
def test_backup_count_keeps_the_newest_copies_in_a_burst(service):
    """Many rotations within one second: the copies kept are the newest ones."""
    svc = service(rotate_bytes=2_000, backup_count=3)
    log = logging.getLogger("burst")
    for i in range(600):
        log.info("burst %05d %s", i, "b" * 30)
        if i % 20 == 19:
            assert svc.flush(10)
    svc.stop()
    kept = rotated_files(str(svc.full_path))
    assert len(kept) == 3
    numbers = []
    for path in kept + [str(svc.full_path)]:
        numbers += [int(m) for m in re.findall(r"Message: burst (\d{5})", Path(path).read_text())]
    # the kept copies and the live file hold one unbroken run ending with the last record
    assert numbers == list(range(numbers[0], 600))


def test_rotate_interval_under_a_second_is_honoured(service):
    svc = service(rotate_interval=0.3, backup_count=50)
    log = logging.getLogger("fast")
    log.info("start")
    assert svc.flush(10)
    def rotated_six_times():
        log.info("more")  # an empty file is never rotated: keep writing
        return svc.health()["rotations"] >= 12

    wait_for(rotated_six_times, timeout=30, what="rotations every 0.3 s")
    # Rotating once a second, as before, can never give two copies stamped with the same
    # second; every 0.3 s it must (copies are named <path>.<second>[-N]).
    names = [os.path.basename(p) for p in rotated_files(str(svc.full_path))]
    assert any(re.search(r"\.\d{8}-\d{6}-\d+$", n) for n in names), names


def test_health_cli_after_main_sigkill_says_gone(tmp_path):
    body = """
    import logging, sys
    import mplog
    svc = mplog.LogService(sys.argv[1]).start()
    svc._run.supervisor.write_health_file()
    print("READY", flush=True)
    sys.stdin.read()
    """
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(body))
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("READY")
        p.kill()
        p.wait(10)
    finally:
        p.stdin.close()
        p.stdout.close()
    health = json.loads((tmp_path / "logs" / "run.health.json").read_text())
    listener = health["listener"]["pid"]
    wait_for(lambda: not os.path.exists(f"/proc/{listener}"), what="the listener to drain and exit")
    out = subprocess.run([sys.executable, "-m", "mplog", "health", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=30)
    report = json.loads(out.stdout)
    assert out.returncode == 1
    assert (report["status"], report["state"], report["listener"]["alive"]) == ("down", "gone", False)
