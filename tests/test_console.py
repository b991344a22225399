"""Console echo and progress bars, checked byte by byte on a real pseudo-terminal; the
demo; dictConfig/fileConfig; structlog; signal handlers."""

from __future__ import annotations

import logging
import logging.config
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import mplog
from conftest import app_blocks


def _run_in_pty(args, timeout=60, env=None):
    """Run a command with stderr and stdout on a pty; return (exit status, bytes written).
    Should it overrun ``timeout`` (below pytest-timeout's), its threads' tracebacks are part of
    the failure: it runs with faulthandler on, and gets SIGABRT."""
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal's size
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
                end = time.monotonic() + 5
                while time.monotonic() < end and select.select([master], [], [], 0.5)[0]:
                    try:
                        out += os.read(master, 65536)
                    except OSError:
                        break
                raise AssertionError(f"timed out after {timeout} s; its output ends:\n"
                                     + out[-6000:].decode("utf-8", "replace"))
            r, _, _ = select.select([master], [], [], min(left, 1.0))
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        return proc.wait(10), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_demo_on_a_terminal_bar_and_lines_do_not_shred(tmp_path):
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    status, out = _run_in_pty([sys.executable, "-m", "mplog", "demo", "--dir", str(tmp_path / "d"),
                               "--items", "120", "--workers", "2"], env=env)
    assert status == 0, out[-2000:]
    text = out.decode("utf-8", "replace").replace("\r\n", "\n")
    # Every log line that reached the console starts after a cleared line (or a newline),
    # never in the middle of a bar.
    for m in re.finditer(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]", text):
        before = text[max(0, m.start() - 12):m.start()]
        assert m.start() == 0 or before.endswith(("\n", "\r\x1b[K", "\x1b[33m", "\x1b[31m", "\x1b[2m", "\x1b[1;31m")), repr(before)
    assert "\x1b[31m" in text  # the ERROR line is coloured on a terminal
    assert re.search(r"align \[#+\] 120/120", text)
    assert "simplified log:" in text and "stop summary:" in text and '"status": "healthy"' in text
    assert (tmp_path / "d" / "demo.debug.log").stat().st_size > 0
    # The joblib stage: its loky workers, made with no mplog code, logged to the service.
    assert "stage report done" in (tmp_path / "d" / "demo.log").read_text()
    assert "summarised" in (tmp_path / "d" / "demo.debug.log").read_text()


def test_console_plain_when_not_a_terminal_or_no_color(tmp_path):
    script = tmp_path / "c.py"
    script.write_text(textwrap.dedent("""
        import logging, sys, mplog
        with mplog.LogService(sys.argv[1], console="WARNING") as svc:
            logging.getLogger("c").info("not echoed")
            logging.getLogger("c").error("echoed \\x1b]0;pwned\\x07 %s", "end")
    """))
    for env_extra in ({}, {"NO_COLOR": "1"}):
        env = dict(os.environ, **env_extra)
        if env_extra:
            status, out = _run_in_pty([sys.executable, str(script), str(tmp_path / "l")], env=env)
            err = out.decode()
        else:
            p = subprocess.run([sys.executable, str(script), str(tmp_path / "l")], capture_output=True, text=True,
                               timeout=60, env=env)
            status, err = p.returncode, p.stderr
        assert status == 0
        assert "not echoed" not in err
        line = [ln for ln in err.splitlines() if "echoed" in ln][0]
        assert line.endswith("ERROR: echoed \\x1b]0;pwned\\x07 end")  # escaped: cannot retitle the terminal
        assert "\x1b" not in err  # no colour either


def test_dictconfig_declares_a_service(tmp_path):
    logging.config.dictConfig({
        "version": 1,
        "handlers": {"mplog": {"class": "mplog.ServiceHandler", "directory": str(tmp_path / "dc"),
                               "name": "cfg", "simplified_level": "WARNING"}},
        "root": {"level": "DEBUG", "handlers": ["mplog"]},
    })
    root = logging.getLogger()
    handler = [h for h in root.handlers if isinstance(h, mplog.ServiceHandler)][0]
    try:
        logging.getLogger("dc").debug("declared in a dict")
        logging.getLogger("dc").warning("also simplified")
        assert handler.service.flush(10)
    finally:
        handler.service.stop()
        root.removeHandler(handler)
    svc = handler.service
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["declared in a dict", "also simplified"]
    assert "WARNING: also simplified" in svc.simplified_path.read_text()
    assert "declared in a dict" not in svc.simplified_path.read_text()


def test_fileconfig_ini(tmp_path):
    ini = tmp_path / "logging.ini"
    ini.write_text(textwrap.dedent(f"""
        [loggers]
        keys=root
        [handlers]
        keys=mplog
        [formatters]
        keys=
        [logger_root]
        level=INFO
        handlers=mplog
        [handler_mplog]
        class=mplog.ServiceHandler
        args=({str(tmp_path / 'ini')!r}, 'ini')
    """))
    logging.config.fileConfig(ini, disable_existing_loggers=False)
    root = logging.getLogger()
    handler = [h for h in root.handlers if isinstance(h, mplog.ServiceHandler)][0]
    try:
        logging.getLogger("ini").info("from ini")
        assert handler.service.flush(10)
    finally:
        handler.service.stop()
        root.removeHandler(handler)
    assert [b["message"] for b in app_blocks(handler.service.full_path)] == ["from ini"]


def test_structlog_through_the_standard_library(service):
    structlog = pytest.importorskip("structlog")
    structlog.configure(
        processors=[structlog.stdlib.add_log_level, structlog.processors.KeyValueRenderer(key_order=["event"])],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    try:
        svc = service()
        structlog.get_logger("sl").info("hello", sample="S7", n=3)
        assert svc.flush(10)
    finally:
        structlog.reset_defaults()
    blocks = app_blocks(svc.full_path)
    assert len(blocks) == 1 and blocks[0]["logger"] == "sl" and blocks[0]["level"] == "INFO"
    assert blocks[0]["message"] == "event='hello' sample='S7' n=3 level='info'"


SIG_APP = """
import logging, os, sys, time
import mplog
svc = mplog.LogService(sys.argv[1])
svc.start()
if sys.argv[2] == "handlers":
    svc.install_signal_handlers()
log = logging.getLogger("sig")
i = 0
while True:
    log.info("n %d", i)
    i += 1
    if i == 2000:
        print(svc.health()["listener"]["pid"], flush=True)
"""


@pytest.mark.parametrize("mode, sig", [("handlers", signal.SIGTERM), ("handlers", signal.SIGINT),
                                       ("none", signal.SIGTERM)])
def test_signal_during_heavy_logging(tmp_path, mode, sig):
    """With install_signal_handlers(): stopped cleanly, usual exit status. Without: the process
    dies at once, yet every record it logged is in the kernel, and the listener drains them
    and exits by itself (no orphan)."""
    script = tmp_path / "s.py"
    script.write_text(SIG_APP)
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "l"), mode], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        import psutil
        listener = psutil.Process(int(p.stdout.readline()))
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        listener.wait(15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    if sig == signal.SIGINT:
        assert p.returncode == -signal.SIGINT and "KeyboardInterrupt" in err  # what Python does on Ctrl-C
    else:
        assert p.returncode == -signal.SIGTERM
    msgs = [b["message"] for b in app_blocks(tmp_path / "l" / "run.debug.log")]
    assert len(msgs) >= 2000
    assert msgs == [f"n {i}" for i in range(len(msgs))]  # a gap-free prefix: nothing lost
    summary = (tmp_path / "l" / "run.log").read_text()
    if mode == "handlers":
        assert f"mplog stopped: {len(msgs)} records written, 0 dropped, 0 lost" in summary
    else:
        assert "the application exited without stopping the log service" in summary


TQDM_APP = """
import logging, sys
from concurrent.futures import ProcessPoolExecutor
from tqdm import tqdm
import mplog

def work(i):
    if i % 10 == 3:
        logging.getLogger("w").warning("item %d looks odd", i)
    return i

if __name__ == "__main__":
    with mplog.LogService(sys.argv[1], console="WARNING") as svc:
        with ProcessPoolExecutor(2, **svc.pool_kwargs()) as pool:
            for _ in tqdm(pool.map(work, range(60)), total=60, mininterval=0):
                svc.flush(5)  # make each echoed line arrive while the bar is on screen
"""


def test_tqdm_bar_and_console_lines_share_the_terminal(tmp_path):
    """With tqdm installed and a bar active, echoed lines go through tqdm.write: each starts on
    a cleared line and the bar is redrawn after it (bytes checked on a real pty)."""
    pytest.importorskip("tqdm")
    script = tmp_path / "t.py"
    script.write_text(TQDM_APP)
    env = dict(os.environ, NO_COLOR="1")
    status, out = _run_in_pty([sys.executable, str(script), str(tmp_path / "l")], env=env)
    assert status == 0, out[-2000:]
    text = out.decode("utf-8", "replace")
    lines = re.findall(r"(.{0,8})\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] WARNING: item (\d+) looks odd", text)
    assert sorted(int(n) for _, n in lines) == [i for i in range(60) if i % 10 == 3]
    for before, _ in lines:
        # tqdm clears the bar's line ('\r' then spaces or an erase) before writing a line
        assert before == "" or before.endswith(("\r", "\n", "\x1b[K", "\x1b[A", " ")), repr(before)
    assert "60/60" in text


FORK_WHILE_ECHOING = """
import fcntl, os, sys, threading, time, warnings
import mplog._supervisor.console as console

# 3.12+ warns, on that very stderr, about fork() in a process with threads: it would block here.
warnings.simplefilter("ignore", DeprecationWarning)

r, w = os.pipe()
sys.stderr = open(w, "w", buffering=1, closefd=False)  # a stderr that nobody reads
capacity = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
threading.Thread(target=console.emit, args=("x" * (4 * capacity) + "\\n",), daemon=True).start()
deadline = time.monotonic() + 20
while int.from_bytes(fcntl.ioctl(r, 0x541B, b"\\0" * 4), "little") < capacity:  # FIONREAD
    assert time.monotonic() < deadline, "the echo never filled the pipe"
    time.sleep(0.01)  # a deadline loop on a condition: the pipe is full
# The echo thread is now blocked inside sys.stderr.write, holding the stream's buffer lock.
# (multiprocessing's Process.start flushes the streams first, which would wait here for the
# write; the fork it makes next can still land inside the echo's next write.)
pid = os.fork()
if pid == 0:
    sys.stderr.flush()  # what a child's exit does
    os._exit(0)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", os.waitstatus_to_exitcode(status), flush=True)
        break
    time.sleep(0.01)  # a deadline loop on a condition: the child's exit
else:
    print("child hangs", flush=True)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
os._exit(0)  # the echo thread stays blocked for good: no exit flush of that stderr
"""


def test_fork_while_the_echo_writes_to_a_stalled_stderr_does_not_hang_the_child(tmp_path):
    """The supervisor thread echoes console lines with sys.stderr.write. A process forked while
    that write blocks (a stderr nobody reads) inherits the stream's lock held; without mplog's
    fork hooks its exit flush hangs for good (a pool worker of the demo did, once). Now the fork
    waits a moment for the echo, then gives the child streams of its own: it exits at once."""
    script = tmp_path / "fork_while_echoing.py"
    script.write_text(FORK_WHILE_ECHOING)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert "child exit 0" in r.stdout, (r.stdout, r.stderr[-2000:])
