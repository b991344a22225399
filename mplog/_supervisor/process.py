"""The listener as a process of the supervisor's: how it is started and how it is ended.

``ListenerProcess`` launches ``python -m mplog._listener`` with its environment and its pipes,
and holds what the supervisor watches it by: a sentinel (a pidfd on Linux, else a lifeline pipe
the listener holds), never a poll of ``is_alive``. It ends one in escalating steps (wait on the
sentinel, then SIGTERM, then SIGKILL); when to ask it to stop, and whether to replace it, stays
the supervisor's. ``exit_name`` names how a process ended, as loky and our logs do, and
``exit_record`` records it; ``unasked_stop`` tells a listener that ended on a stop frame another
process sent, and undoes what that did to the shared state.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Optional

from .._app.capture import clean_environ
from .._common.config import ListenerConfig
from .._common.counters import STATE_DEGRADED, STATE_RUNNING, STATE_STOPPED, Counters

__all__ = ["ListenerProcess", "exit_name", "exit_record", "unasked_stop"]

_REAP_TIMEOUT = 1.0  # a sentinel that fired with the pid not gone yet: how long before a kill
_KILL_WAIT = 2.0  # after SIGKILL, how long to wait for the kernel to reap it
_ESCALATE_WAIT = 0.2  # after each of SIGTERM and SIGKILL at the end of a stop


def exit_name(returncode: Optional[int]) -> str:
    """``SIGKILL(-9)``, ``EXIT(1)``: how loky and our logs name a process's end."""
    if returncode is None:
        return "RUNNING"
    if returncode < 0:
        try:
            return f"{signal.Signals(-returncode).name}({returncode})"
        except ValueError:
            return f"SIGNAL({returncode})"
    return f"EXIT({returncode})"


def exit_record(returncode: Optional[int]) -> Dict[str, Any]:
    """How a listener ended, as health's ``last_exit`` shows it."""
    return {"name": exit_name(returncode), "returncode": returncode, "time": time.time()}


def unasked_stop(c: Counters, degraded: bool) -> Optional[str]:
    """The listener stopped on a stop frame this process did not send (a child that holds a
    copy of the service, an older mplog in it): say who sent it, and undo what the stop did
    to the shared state, or every process would send its records to stderr from now on."""
    sender = c.get("stop_pid")
    if not sender or c.get("state") != STATE_STOPPED:
        return None
    c.set("stop_pid", 0)
    c.set("final_set", 0)
    c.set("state", STATE_DEGRADED if degraded else STATE_RUNNING)
    if sender == os.getpid():
        return "stopped by this process without stop()"
    return f"stopped by process {sender}, not the service's own process (a child that inherited it?)"


def _listener_environ() -> Dict[str, str]:
    env = clean_environ(dict(os.environ))  # the listener is no pool worker to capture
    # The listener must import this very copy of mplog, installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class ListenerProcess:
    """A started listener: its Popen, its sentinel, and the steps that end it."""

    def __init__(self, popen: "subprocess.Popen[bytes]", lifeline: int, written: int) -> None:
        self.popen = popen
        self.written_at_start = written
        self.pid = popen.pid
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.sentinel = lifeline
        self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(self.pid)  # type: ignore[attr-defined]
            self.sentinel = self._pidfd
        except (AttributeError, OSError):
            pass
        self.lifeline = lifeline

    @classmethod
    def spawn(cls, config: ListenerConfig, written: int) -> "ListenerProcess":
        """Start a listener on ``config`` (whose ``reply_fd`` and ``console_fd`` it inherits);
        ``written`` is the written count now, to tell later whether it made progress."""
        life_r, life_w = os.pipe2(os.O_CLOEXEC)
        cfg = config._replace(lifeline_fd=life_w, parent_pid=os.getpid())
        try:
            # A session of its own. The scheduler shares the CPU between sessions first (Linux's
            # autogroup, on by default where the kernel has it), so P busy workers cannot cut the
            # listener down to 1/(P+1) of the machine and leave them all waiting for ring room:
            # 8 workers on 2 cores, 168-202k -> 211-220k records/s; 32, 165-183k -> 223-225k. A signal
            # to the application's process group (timeout, Ctrl-C, a shell's kill -- -PGID) does
            # not end it before it has written what the spool holds: it sees its parent go.
            popen = subprocess.Popen(
                [sys.executable, "-m", "mplog._listener", cfg.to_json()],
                stdin=subprocess.DEVNULL, pass_fds=(cfg.reply_fd, life_w, cfg.console_fd),
                env=_listener_environ(), close_fds=True, start_new_session=True)
        finally:
            os.close(life_w)
        return cls(popen, life_r, written)

    def wait_ready(self, reply_fd: int, timeout: float) -> bool:
        """Wait until ``reply_fd`` is readable (the listener's first reply byte), or its death.
        The byte is left for the caller to drain."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([reply_fd, self.sentinel], [], [], left)
            if reply_fd in r:
                return True
            if self.sentinel in r:
                return False

    def exited(self) -> bool:
        """The sentinel fired (the pid is not reaped here: that is ``reap``'s)."""
        try:
            return bool(select.select([self.sentinel], [], [], 0)[0])
        except (OSError, ValueError):  # closed: it has been reaped
            return True

    def reap(self) -> int:
        """The sentinel fired: collect the exit status and close the sentinel."""
        try:
            rc = self.popen.wait(_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:  # the sentinel fired but it is still here: kill it
            self.popen.kill()
            rc = self.popen.wait()
        self.close()
        return rc

    def wait_exit(self, deadline: float) -> None:
        """Wait on the sentinel until the process has exited or ``deadline`` has passed."""
        while self.popen.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                select.select([self.sentinel], [], [], left)
            except (OSError, ValueError):
                try:
                    self.popen.wait(left)
                except subprocess.TimeoutExpired:
                    return

    def end(self) -> Optional[int]:
        """The last steps of a stop: SIGTERM, then SIGKILL, to one that is still here; then close.
        Returns the exit status (None if even SIGKILL did not end it in time)."""
        if self.popen.poll() is None:
            self.popen.terminate()
            self.wait_exit(time.monotonic() + _ESCALATE_WAIT)
        if self.popen.poll() is None:
            self.popen.kill()
            self.wait_exit(time.monotonic() + _ESCALATE_WAIT)
        rc = self.popen.poll()
        self.close()
        return rc

    def kill(self) -> None:
        """SIGKILL at once (one that did not start), reap it, close."""
        try:
            self.popen.kill()
        except OSError:
            pass
        try:
            self.popen.wait(_KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass
        self.close()

    def close(self) -> None:
        for fd in (self._pidfd, self.lifeline):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._pidfd = self.lifeline = -1
