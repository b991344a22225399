"""The supervisor: starts the listener, restarts it when it dies, and reports health.

It is a thread of the main process and an explicit state machine::

    starting ─▶ running ─(listener exits)─▶ backoff ─(delay)─▶ running ...
        running/backoff ─(stop())─▶ stopping ─▶ stopped

``Supervisor`` is that state machine, with every timeout of it in one place, and hands each
job to its own class:

- ``process.ListenerProcess`` starts a listener (its environment, its pipes) and ends one
  (sentinel → join → terminate → kill); the supervisor watches it through its sentinel (a pidfd
  on Linux, else a lifeline pipe the listener holds), never by polling ``is_alive``;
- ``restart.RestartPolicy`` decides when to restart (at once after a kill from outside, with an
  exponential backoff in a crash loop, *degraded* past ``degraded_restarts`` in
  ``degraded_window`` s) and ``restart.RestartNotices`` which restarts the next listener must
  name in the log. Records wait in the spool all the while; nothing is diverted while it has room;
- ``flush.FlushBarrier`` is where ``flush()`` waits for the listener's reply;
- ``relay.ConsoleRelay`` prints the lines the listener echoes;
- ``probe.ListenerProbe`` gives health the listener's process, vitals and progress, without
  psutil (the listener samples itself, see ``_listener.vitals.Vitals``), and ``healthfile`` writes
  the health file.

It never logs through the queue it serves: its notices reach the files through the listener,
which writes them itself.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from typing import Any, Dict, List, Optional

from .._common.config import ListenerConfig, ServiceConfig
from .._common.counters import STATE_DEGRADED, STATE_RUNNING, STATE_STOPPED, Counters
from .flush import FlushBarrier, drain_pipe
from .healthfile import kernel_status, read_health_file, same_process, write_health_file
from .probe import ListenerProbe
from .process import ListenerProcess, exit_name, exit_record, unasked_stop
from .relay import ConsoleRelay
from .restart import RestartNotices, RestartPolicy

# The health file's functions are named here too: the service and the CLI import them from here.
__all__ = ["RestartPolicy", "Supervisor", "exit_name", "kernel_status", "read_health_file",
           "same_process", "write_health_file"]

_STARTUP_TIMEOUT = 30.0  # a cold interpreter on a loaded 2-core CI machine can be slow
_STOP_ATTEMPTS = 3  # listeners started in a stop to replace one that died instead of stopping
_STOP_MIN_LEFT = 0.5  # a replacement in a stop needs at least this much time left
_STOP_MARGIN = 0.3  # of a stop's time, kept for the escalation after the listener's own stop
_JOIN_THREAD = 1.0  # at most, for the thread to see the stop


def _say(text: str) -> None:
    """A notice on stderr: never through the queue the supervisor serves."""
    try:
        os.write(2, f"mplog: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


class _Wakeup:
    """The pipe that wakes the supervisor's thread from its select (``stop()``)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self._write_fd, b"x")
        except OSError:
            pass

    def clear(self) -> None:
        drain_pipe(self.read_fd)

    def close(self) -> None:
        for fd in (self.read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Supervisor:
    """The state machine: starts the listener, replaces it when it dies, stops it."""

    def __init__(self, config: ServiceConfig, counters: Counters, listener: ListenerConfig,
                 health: Any = None) -> None:
        self.config = config
        self.counters = counters
        self.listener_config = listener
        self.health = health  # a _health.Health, for the periodic health file
        self.state = "stopped"
        self.proc: Optional[ListenerProcess] = None
        self.restarts = 0
        self.last_exit: Optional[Dict[str, Any]] = None
        self.policy = RestartPolicy(config.restart_backoff_initial, config.restart_backoff_max,
                                    config.degraded_restarts, config.degraded_window)
        self.notices = RestartNotices()
        self._restart_at: Optional[float] = None
        self._lock = threading.RLock()
        self._wakeup = _Wakeup()
        self.barrier = FlushBarrier(counters, self._lock)
        self.console = ConsoleRelay()
        self.probe = ListenerProbe(counters)
        self._thread: Optional[threading.Thread] = None
        self._degraded = False
        self._next_health = 0.0

    # -- the listener process ------------------------------------------------------------
    def _spawn(self, restart_reason: Optional[str] = None) -> ListenerProcess:
        # Every listener before this one is dead, so the count of notices they wrote is final.
        late = self.notices.late(self.counters.get("restarts_noted"))
        cfg = self.listener_config._replace(reply_fd=self.barrier.write_fd, restart_reason=restart_reason,
                                            late_restarts=late, console_fd=self.console.write_fd)
        return ListenerProcess.spawn(cfg, self.counters.get("written"))

    def start(self) -> None:
        """Start the listener and wait until it has the files open. Raises OSError if it can't."""
        proc = self._spawn()
        if not proc.wait_ready(self.barrier.read_fd, _STARTUP_TIMEOUT):
            proc.kill()
            raise OSError(errno.EIO, f"the mplog listener did not start ({exit_name(proc.popen.returncode)}); "
                                     "see its message on stderr", str(self.config.directory))
        self.barrier.drain()
        self.proc = proc
        self.state = "running"
        self.counters.set("state", STATE_RUNNING)
        self._next_health = time.monotonic() + self.config.health_interval  # the service writes the first
        self._thread = threading.Thread(target=self._run, name="mplog-supervisor", daemon=True)
        self._thread.start()

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                if self.state in ("stopping", "stopped"):
                    return
                proc, restart_at = self.proc, self._restart_at
            r = self._wait_events(proc, restart_at)
            if self._wakeup.read_fd in r:
                self._wakeup.clear()
            if self.barrier.read_fd in r:
                self.barrier.drain()
            if self.console.read_fd in r:
                self.console.drain()
            with self._lock:
                if self.state in ("stopping", "stopped"):
                    return
                if proc is not None and proc.sentinel in r and proc is self.proc:
                    self._on_exit(proc)
                if self._restart_at is not None and time.monotonic() >= self._restart_at:
                    self._restart()
                self._check_stable()
            if time.monotonic() >= self._next_health:
                self._periodic_health()

    def _wait_events(self, proc: Optional[ListenerProcess], restart_at: Optional[float]) -> List[int]:
        """Sleep until a pipe or the listener's sentinel is readable, or a restart or the health
        file is due; return the readable fds."""
        now = time.monotonic()
        timeout = max(0.0, self._next_health - now)
        if restart_at is not None:
            timeout = min(timeout, max(0.0, restart_at - now))
        fds = [self._wakeup.read_fd, self.barrier.read_fd, self.console.read_fd]
        if proc is not None:
            fds.append(proc.sentinel)
        try:
            return select.select(fds, [], [], timeout)[0]
        except (OSError, ValueError):
            return []

    def _periodic_health(self) -> None:
        self._next_health = time.monotonic() + self.config.health_interval
        try:
            self.write_health_file()
        except Exception as exc:  # never let a full disk kill the supervisor
            _say(f"cannot write the health file: {exc}")

    def _on_exit(self, proc: ListenerProcess) -> None:
        rc = proc.reap()
        self.proc = None
        self.last_exit = exit_record(rc)
        self.state = "backoff"
        c = self.counters
        cause = unasked_stop(c, self._degraded)
        if cause:
            self.last_exit["cause"] = cause
        ready = c.get("listener_pid") == proc.pid
        progressed = c.get("written") > proc.written_at_start or self.probe.backlog() == 0
        delay = self.policy.exited(time.monotonic(), ready=ready, progressed=progressed)
        self._set_degraded(self.policy.degraded)
        self._restart_at = time.monotonic() + delay
        why = f" ({cause})" if cause else ""
        if delay:
            _say(f"listener exited with {self.last_exit['name']}{why}; restarting in {delay:.1f} s")
        else:
            _say(f"listener exited with {self.last_exit['name']}{why}; restarting now")
            self._restart()

    def _restart(self) -> None:
        self._restart_at = None
        reason = self.last_exit["name"] if self.last_exit else "an unknown exit"
        try:
            proc = self._spawn(restart_reason=reason)
        except OSError as exc:
            _say(f"cannot restart the listener: {exc}")
            self._restart_at = time.monotonic() + self.config.restart_backoff_max
            return
        self.proc = proc
        self._count_restart(reason)
        self.state = "running"

    def _count_restart(self, reason: str) -> None:
        self.restarts += 1
        self.notices.add(reason)

    def _check_stable(self) -> None:
        proc = self.proc
        if proc is not None and self.policy.stable(time.monotonic() - proc.started):
            self._set_degraded(False)

    def _set_degraded(self, on: bool) -> None:
        if on == self._degraded:
            return
        self._degraded = on
        if self.state not in ("stopping", "stopped"):
            self.counters.set("state", STATE_DEGRADED if on else STATE_RUNNING)

    # -- flush and stop ------------------------------------------------------------------
    def wait_flushed(self, token: int, deadline: float, resend: Any) -> bool:
        return self.barrier.wait(token, deadline, resend, lambda: self.restarts)

    def stop(self, deadline: float, send_stop: Any) -> None:
        """Drain and stop the listener by ``deadline``; escalate SIGTERM then SIGKILL after it.

        A listener that dies instead of stopping cleanly (killed before or during the stop) is
        replaced while time remains, so the backlog in the FIFO still reaches the files.
        """
        with self._lock:
            if self.state == "stopped":
                return
            self.state = "stopping"
            self._restart_at = None
        self._wakeup.wake()
        if self._thread is not None:
            self._thread.join(max(0.0, min(_JOIN_THREAD, deadline - time.monotonic())))
        for _attempt in range(_STOP_ATTEMPTS):
            proc = self._listener_for_stop(deadline)
            if proc is None:
                break
            budget = max(0.0, deadline - time.monotonic() - _STOP_MARGIN)
            if send_stop(budget, deadline):
                proc.wait_exit(deadline)
            rc = proc.popen.poll()
            if rc is None or rc == 0:
                break
        self._end_listener()
        self.console.drain()  # the stop summary, if it is echoed
        with self._lock:
            self.counters.set("state", STATE_STOPPED)
            self.state = "stopped"
        self._close_pipes()

    def _listener_for_stop(self, deadline: float) -> Optional[ListenerProcess]:
        """The listener to send the stop to: the running one, or a new one in place of one that
        died, while time remains (None: no time, or it cannot start)."""
        with self._lock:
            proc = self.proc
            if proc is not None and proc.popen.poll() is not None:
                self._on_exit_quiet(proc)
                proc = None
            if proc is not None:
                return proc
            if deadline - time.monotonic() < _STOP_MIN_LEFT:
                return None
            reason = self.last_exit["name"] if self.last_exit else None
            try:
                proc = self.proc = self._spawn(restart_reason=reason)
            except OSError:
                return None
            if reason:
                self._count_restart(reason)
            return proc

    def _end_listener(self) -> None:
        """The escalation after the listener's own stop: terminate, then kill, one still here."""
        proc = self.proc
        if proc is None:
            return
        rc = proc.end()
        if rc not in (0, None):
            self.last_exit = exit_record(rc)
        self.proc = None

    def _on_exit_quiet(self, proc: ListenerProcess) -> None:
        rc = proc.popen.poll()
        self.last_exit = exit_record(rc)
        proc.close()
        self.proc = None

    def _close_pipes(self) -> None:
        self._wakeup.close()
        self.barrier.close()
        self.console.close()

    # -- health --------------------------------------------------------------------------
    def listener_info(self) -> Dict[str, Any]:
        """The listener as health reports it: our view of the process (pid, uptime, whether it
        exited) and the vitals it published of itself (see ``probe.ListenerProbe``)."""
        info = self.probe.absent()
        with self._lock:  # _on_exit closes the sentinel under it
            proc = self.proc
            if proc is None or not self.probe.seen(info, proc):
                return info
        self.probe.vitals(info, proc.pid)
        return info

    def progress_stalled(self, written: int, waiting: int) -> bool:
        """Health is progress: records waiting while ``written`` has not moved for 2 s."""
        return self.probe.progress_stalled(written, waiting)

    @property
    def degraded(self) -> bool:
        return self._degraded

    def write_health_file(self) -> None:
        if self.health is not None:
            write_health_file(self.config.health_path, self.health.report(self))


