"""Exit paths, each in a real child interpreter: forgotten stop(), dead listener, killed main,
Ctrl-C, and the listener's own exit when its parent dies."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import START_METHODS, app_blocks

HERE = Path(__file__).parent


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(body))
    return path


def _run(path: Path, *args: str, timeout: float = 60, **kw):
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


APP = """
import logging, multiprocessing, sys, os
import mplog, workers

if __name__ == "__main__":
    method, mode = sys.argv[1], sys.argv[2]
    svc = mplog.LogService(sys.argv[3], shutdown_timeout=5.0)
    svc.start()
    with multiprocessing.get_context(method).Pool(2, **svc.pool_kwargs()) as pool:
        pool.map(workers.log_n, [("exit%d" % k, 2500) for k in range(2)])
    listener = svc.health()["listener"]["pid"]
    if mode == "kill-listener":
        os.kill(listener, 9)
    logging.getLogger("app").info("last words")
    print("LISTENER", listener, flush=True)
    # no stop(): the exit hook must drain and stop the service
"""


@pytest.mark.parametrize("method", START_METHODS)
def test_forgotten_stop_drains_at_exit(tmp_path, method):
    """The `with Pool` idiom terminates workers at once; records they logged are already in the
    spool, and the exit hook writes them all before the program exits. (Order holds per process:
    a listener that is behind reads the rings in turn, so "last words" may come before the end of
    a worker's backlog.)"""
    logs = tmp_path / "logs"
    proc = _run(_script(tmp_path, APP), method, "plain", str(logs))
    assert proc.returncode == 0, proc.stderr
    msgs = [b["message"] for b in app_blocks(logs / "run.debug.log")]
    for k in range(2):
        assert [m for m in msgs if m.startswith(f"exit{k} ")] == [f"exit{k} item {i}" for i in range(2500)]
    assert msgs.count("last words") == 1 and len(msgs) == 5001
    assert "mplog stopped: 5001 records written, 0 dropped, 0 lost" in (logs / "run.log").read_text()


def test_exit_does_not_hang_with_dead_listener(tmp_path):
    """Listener SIGKILLed, stop() forgotten: the program still exits promptly, and the exit
    hook gets a listener to drain what was waiting."""
    logs = tmp_path / "logs"
    proc = _run(_script(tmp_path, APP), "fork", "kill-listener", str(logs), timeout=30)
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split("LISTENER")[1].split()[0])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    msgs = [b["message"] for b in app_blocks(logs / "run.debug.log")]
    assert "last words" in msgs


KILLED_MAIN = """
import logging, os, sys, time
import mplog

if __name__ == "__main__":
    svc = mplog.LogService(sys.argv[1])
    svc.start()
    log = logging.getLogger("app")
    for i in range(3000):
        log.info("before kill %d", i)
    print("LISTENER", svc.health()["listener"]["pid"], os.environ["MPLOG_CAPTURE"].partition(":")[2], flush=True)
    sys.stdin.read()  # wait to be killed
"""


def test_listener_drains_and_exits_when_main_is_sigkilled(tmp_path):
    """The main process is SIGKILLed: the listener writes every record, notes it, exits, and
    removes what the main process would have at stop(), its children's capture directory too."""
    logs = tmp_path / "logs"
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, str(_script(tmp_path, KILLED_MAIN)), str(logs)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        listener = psutil.Process(int(line.split()[1]))
        capture_dir = line.split()[2]
        assert os.path.isfile(os.path.join(capture_dir, "config.json"))
        p.kill()
        p.wait(10)
        listener.wait(10)  # raises TimeoutExpired if it lingers as an orphan
        assert not os.path.exists(capture_dir)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        p.stdin.close()
        p.stdout.close()
    msgs = [b["message"] for b in app_blocks(logs / "run.debug.log")]
    assert msgs == [f"before kill {i}" for i in range(3000)]
    assert "the application exited without stopping the log service" in (logs / "run.log").read_text()


CTRL_C = """
import logging, os, signal, sys
import mplog

if __name__ == "__main__":
    with mplog.LogService(sys.argv[1]) as svc:
        log = logging.getLogger("app")
        for i in range(2000):
            log.info("before ctrl-c %d", i)
        listener = svc.health()["listener"]["pid"]
        try:
            os.killpg(os.getpgrp(), signal.SIGINT)  # what Ctrl-C in a terminal does
            signal.sigtimedwait([], 0.5) if hasattr(signal, "sigtimedwait") else None
            for _ in range(10**8):
                pass
        except KeyboardInterrupt:
            log.info("interrupted; listener alive=%s", os.path.exists("/proc/%d" % listener))
            raise
"""


def test_ctrl_c_to_process_group_keeps_the_tail(tmp_path):
    logs = tmp_path / "logs"
    p = subprocess.run([sys.executable, str(_script(tmp_path, CTRL_C)), str(logs)], capture_output=True,
                       text=True, timeout=60, start_new_session=True)
    assert p.returncode != 0 and "KeyboardInterrupt" in p.stderr
    msgs = [b["message"] for b in app_blocks(logs / "run.debug.log")]
    assert msgs[:2000] == [f"before ctrl-c {i}" for i in range(2000)]
    assert msgs[2000:] == ["interrupted; listener alive=True"]
    assert "mplog stopped: 2001 records written" in (logs / "run.log").read_text()
