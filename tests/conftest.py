"""Shared fixtures: start methods, a service factory, and the no-leftovers guarantees.

Every test that starts processes is bounded (pytest-timeout in setup.cfg/tox.ini and join
timeouts here), restores the root logger, and fails if it leaves a child process behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import psutil
import pytest

import mplog

# Scripts the tests run in a subprocess must import the mplog under test, as the listener they
# start always does, not another copy that happens to be installed (an editable install of
# another checkout): a service and its listener of two versions cannot talk.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mplog.__file__)))
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _ROOT:
    os.environ["PYTHONPATH"] = _ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

# A shell starts a background job (`tox ... &`, `nohup pytest &`) with SIGINT ignored, and an
# ignored signal stays ignored across exec: the scripts the Ctrl-C tests run would then never see
# their SIGINT. A handled signal is reset to the default in an exec'd child, so handling it here
# gives every script what a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]

HEADER = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\] \[([A-Z]+|Level \d+)\] \[([^\]]*)\] \[([^\]]*):(\d+)\] \[([^\]]*)\]$"
)
SEPARATOR = "-" * 72


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """A multiprocessing context, once per start method."""
    # 3.12+: fork() with threads running (our supervisor) warns, once per forked process, when a
    # process starts, so the filter must outlive this fixture (pytest restores the filters
    # after each test). Outside pytest the default filters already ignore it.
    warnings.filterwarnings("ignore", r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)",
                            DeprecationWarning)
    return multiprocessing.get_context(request.param)


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def _our_listeners(basetemp: str) -> List[psutil.Process]:
    """Listener processes of services this test session started, wherever they are in the
    process tree: one runs in a session of its own, so when a test kills its application's
    process group, or its main process, it is reparented to init and is nobody's child."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "mplog._listener" in cmd and any(basetemp in part for part in cmd):
            out.append(p)
    return out


@pytest.fixture(autouse=True)
def _no_children_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail a test that leaves any child process of ours running, or any listener of a
    service it started (forkserver/resource tracker are multiprocessing's own long-lived
    helpers and are allowed)."""
    me = psutil.Process()
    basetemp = str(tmp_path_factory.getbasetemp())
    before = {p.pid for p in me.children(recursive=True)} | {p.pid for p in _our_listeners(basetemp)}
    yield
    deadline = time.monotonic() + 10.0
    while True:
        extra = []
        for p in {q.pid: q for q in me.children(recursive=True) + _our_listeners(basetemp)}.values():
            if p.pid in before:
                continue
            try:
                cmd = " ".join(p.cmdline())
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            if "forkserver" in cmd or "resource_tracker" in cmd:
                continue
            extra.append((p.pid, cmd))
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling a condition with a deadline, not synchronising on a sleep
    for pid, _ in extra:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not extra, f"child processes left behind: {extra}"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., "mplog.LogService"]]:
    """Factory: ``service(**options)`` starts a LogService in tmp_path; all are stopped after."""
    made: List[mplog.LogService] = []

    def make(**options: object) -> "mplog.LogService":
        options.setdefault("shutdown_timeout", 10.0)
        svc = mplog.LogService(tmp_path / "logs", **options)  # type: ignore[arg-type]
        svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.stop()


def read_blocks(path: Path) -> List[Dict[str, object]]:
    """Parse the full log into records; fail on any line that is not part of a well-formed block."""
    text = path.read_text(encoding="utf-8")
    blocks: List[Dict[str, object]] = []
    current: Dict[str, object] = {}
    for line in text.split("\n"):
        if not current:
            if line == "":
                continue
            m = HEADER.match(line)
            assert m, f"not a record header: {line!r}"
            current = {"time": m.group(1), "level": m.group(2), "logger": m.group(3), "process": m.group(4),
                       "pid": int(m.group(5)), "where": m.group(6), "lines": []}
        elif line == SEPARATOR:
            blocks.append(current)
            current = {}
        else:
            assert line.startswith("  "), f"record body line not indented: {line!r}"
            current["lines"].append(line)  # type: ignore[union-attr]
    assert not current, f"unterminated block at the end of {path}"
    for b in blocks:
        lines = b["lines"]
        assert lines and lines[0].startswith("  Message: "), f"block without a message: {b}"  # type: ignore[index]
        msg = [lines[0][len("  Message: "):]]  # type: ignore[index]
        for ln in lines[1:]:  # type: ignore[index]
            if ln.startswith("           "):
                msg.append(ln[11:])
            else:
                break
        b["message"] = "\n".join(msg)
        ctx: Dict[str, str] = {}
        if "  Context:" in lines:  # type: ignore[operator]
            i = lines.index("  Context:") + 1  # type: ignore[union-attr]
            while i < len(lines) and lines[i].startswith("    ") and not lines[i].startswith("      "):  # type: ignore[arg-type]
                k, _, v = lines[i][4:].partition(": ")  # type: ignore[index]
                ctx[k] = v
                i += 1
        b["context"] = ctx
    return blocks


def app_blocks(path: Path) -> List[Dict[str, object]]:
    """Records sent by the application (mplog's own notices excluded)."""
    return [b for b in read_blocks(path) if b["logger"] != "mplog"]


def simplified_lines(path: Path) -> List[str]:
    return [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.startswith("[")]


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Deadline loop on an observable condition."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # the deadline loop's poll interval


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(name, size)`` mounts a small tmpfs (real ENOSPC, EROFS) under tmp_path; skips
    the test where mounting is not allowed; unmounts everything after."""
    mounted: List[Path] = []

    def mount(name: str, size: str = "256k") -> Path:
        mnt = tmp_path / name
        mnt.mkdir(exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in reversed(mounted):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
