"""The supervisor: restarts after real SIGKILLs (idle and under load), torn records, backoff and
the degraded state, exact accounting, health, and the health CLI."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import app_blocks, read_blocks, simplified_lines, wait_for

import workers
from mplog._supervisor.supervisor import RestartPolicy

FAST = dict(restart_backoff_initial=0.01, restart_backoff_max=0.05, degraded_restarts=1000)


def _listener_pid(svc):
    return svc.health()["listener"]["pid"]


def _kill_and_wait_restart(svc, sig=signal.SIGKILL):
    old = _listener_pid(svc)
    os.kill(old, sig)
    return wait_for(lambda: (lambda h: h["listener"]["pid"] if h["listener"]["alive"] and h["listener"]["pid"] != old
                             else None)(svc.health()), timeout=15, what="a restarted listener")


def _restart_notices(svc):
    return [b["message"] for b in read_blocks(svc.full_path)
            if b["logger"] == "mplog" and b["message"].startswith("listener restarted")]


def test_idle_kill_restarts_and_logging_resumes(service, ctx):
    """The trap of a plain multiprocessing.Queue: a listener killed while waiting. Here the next
    records from live processes reach the files, and the exit is named in both logs."""
    svc = service(**FAST)
    logging.getLogger("a").info("before")
    assert svc.flush(10)
    with ctx.Pool(2, **svc.pool_kwargs()) as pool:
        pool.map(workers.log_n, [("warm", 1)])
        assert svc.flush(10)  # idle: nothing read and held by the listener when it is killed
        _kill_and_wait_restart(svc)
        pool.map(workers.log_n, [(f"after{k}", 20) for k in range(2)])
    logging.getLogger("a").info("main after")
    assert svc.flush(10)
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    for k in range(2):
        assert [m for m in msgs if m.startswith(f"after{k} ")] == [f"after{k} item {i}" for i in range(20)]
    assert msgs.count("main after") == 1  # order holds per process, not across them
    assert msgs[0] == "before" and len(msgs) == 1 + 1 + 2 * 20 + 1  # before, warm, after0/1, main after
    assert _restart_notices(svc) == ["listener restarted after SIGKILL(-9); 0 records lost"]
    assert any("WARNING: listener restarted after SIGKILL(-9); 0 records lost" in ln
               for ln in simplified_lines(svc.simplified_path))
    h = svc.health()
    assert h["restarts"] == 1 and h["last_exit"]["name"] == "SIGKILL(-9)"


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM(-15)"), (signal.SIGUSR1, "SIGUSR1(-10)")])
def test_other_exits_named(service, sig, name):
    """A listener ended by a signal other than SIGKILL is named in both logs. SIGTERM to the
    listener alone: it writes what it holds, waits a moment for its group to go too, and, the
    application living on, dies of it so that a successor starts at once."""
    svc = service(**FAST)
    old = _listener_pid(svc)
    logging.getLogger("x").info("before")
    os.kill(old, sig)
    wait_for(lambda: svc.health()["restarts"] == 1 and svc.health()["listener"]["alive"], what="restart")
    logging.getLogger("x").info("after")
    assert svc.flush(10)
    assert svc.health()["last_exit"]["name"] == name
    notices = _restart_notices(svc)
    assert notices == [f"listener restarted after {name}; 0 records lost"]
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["before", "after"]


def _check_accounting(svc, out_dir: Path, tags, extra_sent=0):
    """sent = written + dropped + lost, and the files agree with the counters record by record."""
    final = svc.stop()
    r = final["records"]
    sent_by_workers = sum(int((out_dir / t).read_text()) for t in tags)
    assert r["sent"] == sent_by_workers + extra_sent
    assert r["sent"] == r["written"] + r["dropped"] + r["lost"] + r["diverted"]
    blocks = app_blocks(svc.full_path)
    assert len(blocks) == r["written"]
    seen = set()
    for b in blocks:
        m = re.fullmatch(r"(\S+) item (\d+)", b["message"])
        assert m, b["message"]  # nothing torn or garbled in the file
        key = (m.group(1), int(m.group(2)))
        assert key not in seen, f"duplicated record {key}"
        seen.add(key)
    return final


def test_fifty_kills_under_load_never_deadlock(service, ctx, tmp_path):
    """SIGKILL the listener 50 times while 3 workers log as fast as they can: the pipeline
    finishes, records flow after every restart, and every record is accounted for exactly."""
    svc = service(**FAST)
    stop = ctx.Event()
    tags = [f"w{k}" for k in range(3)]
    procs = [ctx.Process(target=workers.log_until, args=(svc.worker_config, t, stop, str(tmp_path)))
             for t in tags]
    for p in procs:
        p.start()
    try:
        wait_for(lambda: svc.health()["records"]["written"] > 1000, what="load")
        for _ in range(50):
            _kill_and_wait_restart(svc)
            written = svc.health()["records"]["written"]
            wait_for(lambda: svc.health()["records"]["written"] > written, timeout=15,
                     what="records written after the restart")
    finally:
        stop.set()
        for p in procs:
            p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    final = _check_accounting(svc, tmp_path, tags)
    r = final["records"]
    assert final["restarts"] == 50
    notices = _restart_notices(svc)
    assert len(notices) == 50
    # The spool kept what each dead listener had not written: a kill loses nothing.
    assert all(n.endswith("; 0 records lost") for n in notices)
    assert (r["lost"], r["lost_with_listener"], r["torn"], r["diverted"]) == (0, 0, 0, 0)


def test_a_listener_killed_before_its_restart_notice_leaves_no_restart_unnamed(service):
    """Each restart's notice is written by the listener that replaces the dead one. A listener
    killed while it starts, before it writes that notice, took the notice of its predecessor's
    death with it (seen once in 50 kills under 3.13): the next listener writes both."""
    svc = service(**FAST)
    logging.getLogger("a").info("before")
    assert svc.flush(10)
    first = _listener_pid(svc)
    os.kill(first, signal.SIGKILL)
    # The successor is killed as soon as the supervisor has started it: the interpreter takes
    # tens of ms to start, this loop 10 ms to see it.
    second = wait_for(lambda: (lambda pid: pid if pid not in (None, first) else None)(_listener_pid(svc)),
                      timeout=15, what="the successor's pid")
    os.kill(second, signal.SIGKILL)
    third = wait_for(lambda: (lambda h: h["listener"]["pid"] if h["listener"]["alive"]
                              and h["listener"]["pid"] not in (first, second) else None)(svc.health()),
                     timeout=15, what="a third listener")
    logging.getLogger("a").info("after")
    assert svc.flush(10)
    assert svc.health()["restarts"] == 2 and third
    notices = _restart_notices(svc)
    assert len(notices) == 2, notices
    assert all(n.startswith("listener restarted after SIGKILL(-9)") and n.endswith("; 0 records lost")
               for n in notices), notices
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["before", "after"]


def test_fifty_idle_kills(service):
    svc = service(**FAST)
    log = logging.getLogger("idle")
    for i in range(50):
        _kill_and_wait_restart(svc)
        log.info("after kill %d", i)
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == [f"after kill {i}" for i in range(50)]
    assert svc.health()["records"]["lost"] == 0


def test_worker_killed_while_spooling_a_record_of_megabytes(service, ctx, tmp_path):
    """A worker SIGKILLed while it writes an 8 MB record into the spool: other processes keep
    logging, the file holds no fragment of it, and the accounting is exact either way (killed
    before it published the record: never sent; after: sent and written)."""
    svc = service(queue_size=100, **FAST)
    spool = svc.health()["queue"]["spool"]
    p = ctx.Process(target=workers.log_big, args=(svc.worker_config, 8 * 1024 * 1024))
    p.start()
    wait_for(lambda: glob.glob(os.path.join(spool, "ring.*.*")), timeout=60, what="the big record's own file")
    p.kill()
    p.join(10)
    with ctx.Pool(2, **svc.pool_kwargs()) as pool:
        pool.map(workers.log_n, [(f"other{k}", 100) for k in range(2)])
    logging.getLogger("m").info("main still logs")
    assert svc.flush(20)
    blocks = app_blocks(svc.full_path)
    msgs = [b["message"] for b in blocks]
    assert msgs.count("main still logs") == 1
    big = [m for m in msgs if m.startswith("big ")]
    assert big == [] or big == ["big " + "B" * (8 * 1024 * 1024)]  # whole, or not at all
    assert len(msgs) == 201 + len(big)
    # The dead writer's ring and any half-written file of it go once its ring is empty.
    wait_for(lambda: not [f for f in glob.glob(os.path.join(spool, "ring.*.*"))], timeout=10,
             what="the dead worker's files removed")
    final = svc.stop()
    r = final["records"]
    assert r["sent"] == 201 + len(big) == r["written"] and r["lost"] == 0 and r["torn"] == 0


def _crash_loop(monkeypatch):
    # Every listener started from now on dies as its interpreter starts (EXIT(1)): a real
    # crash loop, with no fault hook in mplog.
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")


def test_backoff_then_degraded_then_recovered(service, capfd, monkeypatch):
    """A listener that dies as it starts, more than `degraded_restarts` times in the window:
    degraded, while records wait in the spool (nothing is diverted while it has room); once a
    listener starts and stays up for the longest backoff, the service is healthy again."""
    svc = service(restart_backoff_initial=0.05, restart_backoff_max=0.5, degraded_restarts=2, degraded_window=60)
    _crash_loop(monkeypatch)
    os.kill(_listener_pid(svc), signal.SIGKILL)
    wait_for(lambda: svc.health()["status"] == "degraded" and svc.health()["restarts"] >= 3, timeout=15,
             what="degraded after a crash loop")
    assert svc.health()["last_exit"]["name"] == "EXIT(1)"
    logging.getLogger("d").warning("while degraded")
    assert svc.health()["records"]["diverted"] == 0
    monkeypatch.delenv("PYTHONHOME")
    wait_for(lambda: svc.health()["status"] == "healthy", timeout=15, what="recovery")
    logging.getLogger("d").info("recovered")
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["while degraded", "recovered"]
    r = svc.stop()["records"]
    assert r["sent"] == r["written"] == 2 and r["diverted"] == 0
    assert "restarting now" in capfd.readouterr().err  # the first, a kill from outside: at once


def test_backoff_grows_exponentially_in_a_crash_loop(service, capfd, monkeypatch):
    svc = service(restart_backoff_initial=0.05, restart_backoff_max=0.4, degraded_restarts=100)
    _crash_loop(monkeypatch)
    os.kill(_listener_pid(svc), signal.SIGKILL)
    wait_for(lambda: svc.health()["restarts"] >= 5, timeout=15, what="five restarts")
    monkeypatch.delenv("PYTHONHOME")
    delays = [float(x) for x in re.findall(r"restarting in ([\d.]+) s", capfd.readouterr().err)]
    assert delays[:4] == [0.1, 0.1, 0.2, 0.4]  # 0.05 prints as 0.1


@pytest.mark.parametrize("events, want", [
    # (ready, progressed) per exit -> delays
    ([(True, True)] * 4, [0.0, 0.0, 0.0, 0.0]),  # killed from outside while working: at once
    ([(False, False)] * 5, [0.1, 0.2, 0.4, 0.8, 1.0]),  # dies as it starts: exponential, capped
    ([(True, False)] * 3, [0.1, 0.2, 0.4]),  # comes up but never writes what waits: a loop too
])
def test_restart_policy_delays(events, want):
    policy = RestartPolicy(initial=0.1, maximum=1.0, degraded_restarts=100, window=60.0)
    got = [policy.exited(float(i), ready=r, progressed=p) for i, (r, p) in enumerate(events)]
    assert got == pytest.approx(want)


def test_restart_policy_degrades_and_recovers():
    policy = RestartPolicy(initial=0.1, maximum=1.0, degraded_restarts=2, window=60.0)
    for t in range(3):
        policy.exited(float(t), ready=False, progressed=False)
    assert policy.degraded and policy.exited(3.0, ready=False, progressed=False) == 1.0
    assert not policy.stable(0.5) and policy.degraded
    assert policy.stable(1.0) and not policy.degraded
    assert policy.exited(10.0, ready=False, progressed=False) == pytest.approx(0.1)  # backoff reset


def test_restart_policy_window_forgets_old_failures():
    policy = RestartPolicy(initial=0.1, maximum=1.0, degraded_restarts=2, window=10.0)
    for t in (0.0, 1.0, 20.0, 21.0):
        policy.exited(t, ready=False, progressed=False)
    assert not policy.degraded  # never more than 2 within 10 s


def test_health_fields_and_json(service):
    svc = service()
    logging.getLogger("h").info("x")
    assert svc.flush(10)
    h = svc.health()
    json.dumps(h)
    assert h["status"] == "healthy"
    for key in ("pid", "alive", "status", "cpu_percent", "rss_bytes", "num_fds", "uptime_s"):
        assert key in h["listener"]
    listener = psutil.Process(h["listener"]["pid"])
    # The listener samples itself once a second; the service attached its ring and pidfd since.
    wait_for(lambda: svc.health()["listener"]["num_fds"] == listener.num_fds(), what="a sample with every fd")
    assert h["listener"]["alive"]
    assert h["listener"]["rss_bytes"] > 1_000_000
    assert set(h["records"]) >= {"sent", "written", "dropped", "lost"}
    assert h["records"]["sent"] == h["records"]["written"] == 1
    assert h["queue"] == {**h["queue"], "depth": 0, "capacity": 10000}
    assert h["files"]["full"]["size_bytes"] == svc.full_path.stat().st_size
    assert h["files"]["simplified"]["path"] == str(svc.simplified_path)
    assert 0 <= h["last_write_age_s"] < 60
    assert h["restarts"] == 0 and h["last_exit"] is None


VITALS = """
import json, logging, multiprocessing, os, sys, time
import mplog, workers

def main():
    svc = mplog.LogService(sys.argv[1], name="v")
    svc.start()
    first = json.loads(svc.health_path.read_text())["service"]["updated"]
    with multiprocessing.get_context(sys.argv[2]).Pool(2, **svc.pool_kwargs()) as pool:
        in_workers = pool.map(workers.modules_loaded, [("psutil",)] * 2)
    assert svc.flush(30)
    deadline = time.monotonic() + 30
    while json.loads(svc.health_path.read_text())["service"]["updated"] <= first:  # a periodic write
        assert time.monotonic() < deadline, "the health file was not refreshed"
        time.sleep(0.01)
    print(json.dumps({"main": "psutil" in sys.modules, "workers": in_workers, "health": svc.health(),
                      "file": json.loads(svc.health_path.read_text())}), flush=True)
    sys.stdin.read()
    svc.stop()

if __name__ == "__main__":
    main()
"""


def test_health_has_the_listeners_vitals_and_psutil_stays_out_of_the_main_process(tmp_path, ctx):
    """A forked worker maps whatever its parent had, and psutil was 1.0 MB of each: the listener
    samples itself with psutil and publishes the figures in the shared counters, so neither the
    main process (health reports, the periodic health file) nor its workers import psutil."""
    script = tmp_path / "app.py"
    script.write_text(VITALS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(workers.__file__),
                                                       os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs"), ctx.get_start_method()],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        out = json.loads(p.stdout.readline())
        assert out["main"] is False and out["workers"] == [[], []], out
        for report in (out["health"], out["file"]):
            listener = report["listener"]
            ps = psutil.Process(listener["pid"])
            assert listener["alive"] and listener["status"] == "running", listener
            assert abs(listener["create_time"] - ps.create_time()) < 0.01
            assert abs(report["service"]["create_time"] - psutil.Process(p.pid).create_time()) < 0.01
            assert listener["rss_bytes"] > 1_000_000 and listener["num_fds"] > 3
            assert isinstance(listener["cpu_percent"], float) and listener["cpu_percent"] >= 0
            assert 0 <= listener["sample_age_s"] < 5
    finally:
        p.stdin.close()
        try:
            p.wait(60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
            p.stdout.close()
    assert p.returncode == 0


def test_a_listener_that_cannot_import_psutil_still_runs_and_answers(tmp_path):
    """Vitals must never stop the listener: where psutil cannot be imported (here a module that
    shadows it and raises), records are written, the listener's samples still say it runs, and
    the figures psutil would have given are None. The main process never tries."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "psutil.py").write_text("raise ImportError('psutil is broken here')\n")
    script = textwrap.dedent(f"""
        import json, logging, sys, time
        import mplog
        with mplog.LogService({str(tmp_path / "logs")!r}, name="np") as svc:
            logging.getLogger("t").info("without psutil")
            assert svc.flush(30)
            deadline = time.monotonic() + 30
            while svc.health()["listener"]["status"] != "running":
                assert time.monotonic() < deadline, svc.health()
                time.sleep(0.01)
            print(json.dumps(svc.health()))
    """)
    env = dict(os.environ, PYTHONPATH=str(fake))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out
    h = json.loads(out.stdout)
    assert h["status"] == "healthy" and h["records"]["written"] == 1, h
    assert h["listener"]["alive"] and h["listener"]["sample_age_s"] < 5
    assert (h["listener"]["rss_bytes"], h["listener"]["num_fds"], h["listener"]["cpu_percent"]) == (None, None, None)
    assert h["service"]["create_time"] is None
    assert "without psutil" in (tmp_path / "logs" / "np.log").read_text()


def test_an_unresponsive_listener_is_named_in_health_and_by_the_cli(service):
    """SIGSTOP stands in for a listener stuck in a stalled write: its self-sample goes stale,
    health says so (degraded, with the sample's age), and the CLI, which may import psutil, adds
    the kernel's word for it."""
    svc = service()
    listener = _listener_pid(svc)
    os.kill(listener, signal.SIGSTOP)
    try:
        h = wait_for(lambda: (lambda h: h if h["listener"]["status"] == "unresponsive" else None)(svc.health()),
                     timeout=30, what="a stale sample")
        assert h["listener"]["alive"] and h["listener"]["sample_age_s"] >= 5
        assert h["status"] == "degraded" and "not answered" in h["reason"], h
        svc._run.supervisor.write_health_file()
        res = _cli(svc.config.directory)
        assert res.returncode == 1
        assert json.loads(res.stdout)["listener"]["status"] == "unresponsive (stopped)", res.stdout
    finally:
        os.kill(listener, signal.SIGCONT)
    wait_for(lambda: svc.health()["listener"]["status"] == "running", timeout=30, what="a fresh sample")
    assert svc.health()["status"] == "healthy"


def _cli(directory, *args):
    return subprocess.run([sys.executable, "-m", "mplog", "health", str(directory), *args],
                          capture_output=True, text=True, timeout=60)


def test_health_file_and_cli_exit_codes(service, tmp_path):
    assert _cli(tmp_path / "nothing").returncode == 2
    svc = service()
    # The supervisor refreshes the file every second (atomic replace, not world-writable).
    first = json.loads(svc.health_path.read_text())["service"]["updated"]
    wait_for(lambda: json.loads(svc.health_path.read_text())["service"]["updated"] > first, what="a refresh")
    assert svc.health_path.stat().st_mode & 0o022 == 0
    ok = _cli(svc.config.directory)
    assert ok.returncode == 0, ok.stdout
    assert json.loads(ok.stdout)["status"] == "healthy"
    listener = _listener_pid(svc)
    os.kill(listener, signal.SIGSTOP)
    try:
        logging.getLogger("c").info("stuck")
        wait_for(lambda: _cli(svc.config.directory).returncode == 1, timeout=15, what="degraded via the CLI")
    finally:
        os.kill(listener, signal.SIGCONT)
    svc.stop()
    down = _cli(svc.config.directory)
    assert down.returncode == 1 and json.loads(down.stdout)["status"] == "down"


STALE = """
import sys, logging, mplog
svc = mplog.LogService(sys.argv[1])
svc.start()
svc.supervisor_health = svc.health_path.read_text()
print(svc.health()["listener"]["pid"], flush=True)
sys.stdin.read()
"""


def test_stale_health_file_of_crashed_run_reads_down(tmp_path):
    """The main process is SIGKILLed: its last health file said healthy, but the pid is gone."""
    script = tmp_path / "app.py"
    script.write_text(STALE)
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "logs")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        listener = psutil.Process(int(p.stdout.readline()))
        assert json.loads((tmp_path / "logs" / "run.health.json").read_text())["status"] == "healthy"
        p.kill()
        p.wait(10)
        listener.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        p.stdin.close()
        p.stdout.close()
    res = _cli(tmp_path / "logs")
    assert res.returncode == 1
    assert json.loads(res.stdout)["status"] == "down"
    assert "gone" in json.loads(res.stdout)["reason"]


def test_no_thread_of_the_service_imports_a_module_for_the_first_time(tmp_path):
    """A fork while another thread runs a module's first import leaves the child that module's
    lock held by a thread it does not have: the child's own import of it then waits for good
    (README, "Benchmark": why psutil is imported at start). So the supervisor's thread, which
    writes health reports, echoes the console and restarts the listener, must find every module
    it uses imported already. An audit hook sees every first import and the thread it ran in."""
    script = textwrap.dedent(f"""
        import json, os, signal, sys, threading, time
        first_imports = []
        def hook(event, args):
            if event == "import" and threading.current_thread() is not threading.main_thread():
                first_imports.append((threading.current_thread().name, args[0]))
        sys.addaudithook(hook)
        import logging, mplog
        with mplog.LogService({str(tmp_path)!r}, name="t", console="INFO", health_interval=0.05,
                              restart_backoff_initial=0.01, restart_backoff_max=0.05) as svc:
            logging.getLogger("t").warning("before the kill")
            assert svc.flush(30)
            os.kill(svc.health()["listener"]["pid"], signal.SIGKILL)
            # start() wrote the first report (restarts 0) in the main thread; one that counts the
            # restart is the supervisor thread's, written after it restarted the listener.
            health = os.path.join({str(tmp_path)!r}, "t.health.json")
            deadline, in_file = time.monotonic() + 30, 0
            while in_file < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # a deadline loop on the file's content
                with open(health) as f:
                    in_file = json.load(f)["restarts"]
            logging.getLogger("t").warning("after the restart")
            assert svc.flush(30)
            print("restarts", svc.health()["restarts"], "in the health file", in_file)
        print("first imports in other threads", first_imports)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out
    assert "restarts 1 in the health file 1" in out.stdout, out
    assert "first imports in other threads []" in out.stdout, out
