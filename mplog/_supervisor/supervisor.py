"""The supervisor: starts the listener, restarts it when it dies, and reports health.

It is a thread of the main process and an explicit state machine::

    starting ─▶ running ─(listener exits)─▶ backoff ─(delay)─▶ running ...
        running/backoff ─(stop())─▶ stopping ─▶ stopped

When to restart is ``RestartPolicy``'s decision, a pure class: a listener that had come up and
was doing its work is replaced at once (a kill from outside, the OOM killer); one that dies as
it starts, or dies without writing what was waiting, is in a crash loop and gets an exponential
backoff. More than ``degraded_restarts`` such restarts in ``degraded_window`` s set the service
state to *degraded* while restarts go on at the longest backoff. Records wait in the spool all
the while; nothing is diverted while it has room.

It watches the listener through a process sentinel (a pidfd on Linux, else a lifeline pipe the
listener holds), never by polling ``is_alive``. It does not import psutil: the listener samples
itself and publishes the figures in the shared counters (see ``_listener.Vitals``), so that a
forked worker does not map psutil with the rest of its parent. It never logs through the queue
it serves: its notices reach the files through the listener, which writes them itself.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional

from .._common.config import ListenerConfig, ServiceConfig
from .._app.capture import clean_environ
from .console import emit
from .._common.counters import STATE_DEGRADED, STATE_RUNNING, STATE_STOPPED, Counters

__all__ = ["RestartPolicy", "Supervisor", "exit_name", "read_health_file"]

_STARTUP_TIMEOUT = 30.0  # a cold interpreter on a loaded 2-core CI machine can be slow
# The listener samples itself once a second, from its loop: a sample older than this means the
# loop is stuck (a stalled file system, SIGSTOP) or starved of the CPU for that long.
UNRESPONSIVE_AFTER = 5.0


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


class RestartPolicy:
    """How long to wait before the next listener, from how the last one ended. No processes,
    no clock of its own: the caller passes ``now``, so it is tested in-process."""

    def __init__(self, initial: float, maximum: float, degraded_restarts: int, window: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.degraded_restarts = degraded_restarts
        self.window = window
        self.degraded = False
        self._failures = 0  # consecutive crash-loop exits: drives the backoff
        self._times: Deque[float] = deque()

    def exited(self, now: float, *, ready: bool, progressed: bool) -> float:
        """The listener exited; return the delay before the next one.

        ``ready``: it had come up (files open, spool settled). ``progressed``: it wrote records
        after it came up, or had none to write. A listener that was both was running normally:
        whatever ended it came from outside, and its successor starts at once.
        """
        if ready and progressed:
            return 0.0
        self._times.append(now)
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        self._failures += 1
        if len(self._times) > self.degraded_restarts:
            self.degraded = True
        if self.degraded:
            return self.maximum
        return min(self.maximum, self.initial * 2 ** (self._failures - 1))

    def stable(self, uptime: float) -> bool:
        """A listener that stays up for the longest backoff has recovered: reset. Returns True
        if that ended the degraded state."""
        if (self._failures or self.degraded) and uptime >= self.maximum:
            was = self.degraded
            self._failures = 0
            self._times.clear()
            self.degraded = False
            return was
        return False


class _Process:
    """A started listener: its Popen and a sentinel."""

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

    def exited(self) -> bool:
        """The sentinel fired (the pid is not reaped here: that is ``_on_exit``'s)."""
        try:
            return bool(select.select([self.sentinel], [], [], 0)[0])
        except (OSError, ValueError):  # closed: _on_exit has been
            return True

    def close(self) -> None:
        for fd in (self._pidfd, self.lifeline):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._pidfd = self.lifeline = -1


class Supervisor:
    def __init__(self, config: ServiceConfig, counters: Counters, listener: ListenerConfig,
                 health: Any = None) -> None:
        self.config = config
        self.counters = counters
        self.listener_config = listener
        self.health = health  # a _health.Health, for the periodic health file
        self.state = "stopped"
        self.proc: Optional[_Process] = None
        self.restarts = 0
        # The reasons of the restarts whose notice no listener has written yet, oldest first,
        # and the listeners' count of written notices when they were last trimmed (_spawn).
        self._unnoted: List[str] = []
        self._noted = 0
        self.last_exit: Optional[Dict[str, Any]] = None
        self.policy = RestartPolicy(config.restart_backoff_initial, config.restart_backoff_max,
                                    config.degraded_restarts, config.degraded_window)
        self._restart_at: Optional[float] = None
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._reply_r, self._reply_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Console lines come back from the listener and are printed here, in the main process,
        # so that they cooperate with progress bars (see _console).
        self._console_r, self._console_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._console_tail = b""
        self._thread: Optional[threading.Thread] = None
        self._degraded = False
        self._progress = (0, time.monotonic())  # (written, when it last moved)
        self._next_health = 0.0

    # -- the listener process ------------------------------------------------------------
    def _spawn(self, restart_reason: Optional[str] = None) -> _Process:
        # Every listener before this one is dead, so the count of notices they wrote is final:
        # those were the oldest of _unnoted; the others are this listener's to write. (Past 20,
        # a storm of listeners killed while starting, the oldest go unnamed but on stderr.)
        noted = self.counters.get("restarts_noted")
        del self._unnoted[:max(0, noted - self._noted)]
        del self._unnoted[:-20]
        self._noted = noted
        life_r, life_w = os.pipe2(os.O_CLOEXEC)
        cfg = self.listener_config._replace(reply_fd=self._reply_w, lifeline_fd=life_w,
                                            parent_pid=os.getpid(), restart_reason=restart_reason,
                                            late_restarts=tuple(self._unnoted), console_fd=self._console_w)
        written = self.counters.get("written")
        env = clean_environ(dict(os.environ))  # the listener is no pool worker to capture
        # The listener must import this very copy of mplog, installed or not.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            # A session of its own. The scheduler shares the CPU between sessions first (Linux's
            # autogroup, on by default where the kernel has it), so P busy workers cannot cut the
            # listener down to 1/(P+1) of the machine and leave them all waiting for ring room:
            # 8 workers on 2 cores, 168-202k -> 211-220k records/s; 32, 165-183k -> 223-225k. A signal
            # to the application's process group (timeout, Ctrl-C, a shell's kill -- -PGID) does
            # not end it before it has written what the spool holds: it sees its parent go.
            popen = subprocess.Popen(
                [sys.executable, "-m", "mplog._listener", cfg.to_json()],
                stdin=subprocess.DEVNULL, pass_fds=(self._reply_w, life_w, self._console_w), env=env, close_fds=True,
                start_new_session=True)
        finally:
            os.close(life_w)
        return _Process(popen, life_r, written)

    def _wait_ready(self, proc: _Process, timeout: float) -> bool:
        """Wait for the listener's first reply byte, or its death."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self._reply_r, proc.sentinel], [], [], left)
            if self._reply_r in r:
                self._drain_reply()
                return True
            if proc.sentinel in r:
                return False

    def _drain_reply(self) -> None:
        try:
            while os.read(self._reply_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._cond:
            self._cond.notify_all()

    def drain_console(self) -> None:
        try:
            while True:
                data = os.read(self._console_r, 65536)
                if not data:
                    break
                data = self._console_tail + data
                cut = data.rfind(b"\n") + 1
                self._console_tail = data[cut:]
                if cut:
                    emit(data[:cut].decode("utf-8", "replace"))
        except (BlockingIOError, OSError):
            pass

    def start(self) -> None:
        """Start the listener and wait until it has the files open. Raises OSError if it can't."""
        proc = self._spawn()
        if not self._wait_ready(proc, _STARTUP_TIMEOUT):
            self._kill(proc)
            raise OSError(errno.EIO, f"the mplog listener did not start ({exit_name(proc.popen.returncode)}); "
                                     "see its message on stderr", str(self.config.directory))
        self.proc = proc
        self.state = "running"
        self.counters.set("state", STATE_RUNNING)
        self._next_health = time.monotonic() + self.config.health_interval  # the service writes the first
        self._thread = threading.Thread(target=self._run, name="mplog-supervisor", daemon=True)
        self._thread.start()

    def _kill(self, proc: _Process) -> None:
        try:
            proc.popen.kill()
        except OSError:
            pass
        try:
            proc.popen.wait(2.0)
        except subprocess.TimeoutExpired:
            pass
        proc.close()

    # -- the thread ----------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                if self.state in ("stopping", "stopped"):
                    return
                proc = self.proc
                restart_at = self._restart_at
            now = time.monotonic()
            timeout = max(0.0, self._next_health - now)
            if restart_at is not None:
                timeout = min(timeout, max(0.0, restart_at - now))
            fds = [self._wake_r, self._reply_r, self._console_r]
            if proc is not None:
                fds.append(proc.sentinel)
            try:
                r, _, _ = select.select(fds, [], [], timeout)
            except (OSError, ValueError):
                r = []
            if self._wake_r in r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            if self._reply_r in r:
                self._drain_reply()
            if self._console_r in r:
                self.drain_console()
            with self._lock:
                if self.state in ("stopping", "stopped"):
                    return
                if proc is not None and proc.sentinel in r and proc is self.proc:
                    self._on_exit(proc)
                if self._restart_at is not None and time.monotonic() >= self._restart_at:
                    self._restart()
                self._check_stable()
            if time.monotonic() >= self._next_health:
                self._next_health = time.monotonic() + self.config.health_interval
                try:
                    self.write_health_file()
                except Exception as exc:  # never let a full disk kill the supervisor
                    try:
                        os.write(2, f"mplog: cannot write the health file: {exc}\n".encode())
                    except OSError:
                        pass

    def _on_exit(self, proc: _Process) -> None:
        try:
            rc = proc.popen.wait(1.0)
        except subprocess.TimeoutExpired:  # the sentinel fired but it is still here: kill it
            proc.popen.kill()
            rc = proc.popen.wait()
        proc.close()
        self.proc = None
        self.last_exit = {"name": exit_name(rc), "returncode": rc, "time": time.time()}
        self.state = "backoff"
        c = self.counters
        cause = self._unasked_stop(c)
        if cause:
            self.last_exit["cause"] = cause
        ready = c.get("listener_pid") == proc.pid
        progressed = c.get("written") > proc.written_at_start or self.backlog() == 0
        delay = self.policy.exited(time.monotonic(), ready=ready, progressed=progressed)
        self._set_degraded(self.policy.degraded)
        self._restart_at = time.monotonic() + delay
        why = f" ({cause})" if cause else ""
        if delay:
            self._say(f"listener exited with {self.last_exit['name']}{why}; restarting in {delay:.1f} s")
        else:
            self._say(f"listener exited with {self.last_exit['name']}{why}; restarting now")
            self._restart()

    def _unasked_stop(self, c: Counters) -> Optional[str]:
        """The listener stopped on a stop frame this process did not send (a child that holds a
        copy of the service, an older mplog in it): say who sent it, and undo what the stop did
        to the shared state, or every process would send its records to stderr from now on."""
        sender = c.get("stop_pid")
        if not sender or c.get("state") != STATE_STOPPED:
            return None
        c.set("stop_pid", 0)
        c.set("final_set", 0)
        c.set("state", STATE_DEGRADED if self._degraded else STATE_RUNNING)
        if sender == os.getpid():
            return "stopped by this process without stop()"
        return f"stopped by process {sender}, not the service's own process (a child that inherited it?)"

    def backlog(self) -> int:
        """Records published in the rings and not yet written (or diverted) by the listener."""
        c = self.counters
        t = c.slot_totals()
        published = t["sent"] - t["dropped"] - t["diverted"]
        return max(0, published - c.get("written") - c.get("stderr_records") - c.get("torn"))

    @staticmethod
    def _say(text: str) -> None:
        try:
            os.write(2, f"mplog: {text}\n".encode("utf-8", "backslashreplace"))
        except OSError:
            pass

    def _restart(self) -> None:
        self._restart_at = None
        reason = self.last_exit["name"] if self.last_exit else "an unknown exit"
        try:
            proc = self._spawn(restart_reason=reason)
        except OSError as exc:
            self._say(f"cannot restart the listener: {exc}")
            self._restart_at = time.monotonic() + self.config.restart_backoff_max
            return
        self.proc = proc
        self._count_restart(reason)
        self.state = "running"

    def _count_restart(self, reason: str) -> None:
        self.restarts += 1
        self._unnoted.append(reason)

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
        generation = self.restarts
        with self._cond:
            while self.counters.get("flushed_token") < token:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self.restarts != generation:  # the marker may have died with a listener
                    generation = self.restarts
                    resend()
                self._cond.wait(min(left, 0.1))
        return True

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
        self._wake()
        if self._thread is not None:
            self._thread.join(max(0.0, min(1.0, deadline - time.monotonic())))
        for _attempt in range(3):
            with self._lock:
                proc = self.proc
                if proc is not None and proc.popen.poll() is not None:
                    self._on_exit_quiet(proc)
                    proc = None
                if proc is None:
                    if deadline - time.monotonic() < 0.5:
                        break
                    reason = self.last_exit["name"] if self.last_exit else None
                    try:
                        proc = self.proc = self._spawn(restart_reason=reason)
                    except OSError:
                        break
                    if reason:
                        self._count_restart(reason)
            budget = max(0.0, deadline - time.monotonic() - 0.3)
            if send_stop(budget, deadline):
                self._wait_exit(proc, deadline)
            rc = proc.popen.poll()
            if rc is None or rc == 0:
                break
        proc = self.proc
        if proc is not None:
            if proc.popen.poll() is None:
                proc.popen.terminate()
                self._wait_exit(proc, time.monotonic() + 0.2)
            if proc.popen.poll() is None:
                proc.popen.kill()
                self._wait_exit(proc, time.monotonic() + 0.2)
            rc = proc.popen.poll()
            if rc not in (0, None):
                self.last_exit = {"name": exit_name(rc), "returncode": rc, "time": time.time()}
            proc.close()
            self.proc = None
        self.drain_console()  # the stop summary, if it is echoed
        with self._lock:
            self.counters.set("state", STATE_STOPPED)
            self.state = "stopped"
        for fd in (self._wake_r, self._wake_w, self._reply_r, self._reply_w, self._console_r, self._console_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _on_exit_quiet(self, proc: _Process) -> None:
        rc = proc.popen.poll()
        self.last_exit = {"name": exit_name(rc), "returncode": rc, "time": time.time()}
        proc.close()
        self.proc = None

    def _wait_exit(self, proc: _Process, deadline: float) -> None:
        while proc.popen.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                select.select([proc.sentinel], [], [], left)
            except (OSError, ValueError):
                try:
                    proc.popen.wait(left)
                except subprocess.TimeoutExpired:
                    return

    # -- health --------------------------------------------------------------------------
    def listener_info(self) -> Dict[str, Any]:
        """The listener as health reports it: our view of the process (pid, uptime, whether it
        exited) and the vitals it published of itself (see ``_listener.Vitals``)."""
        info: Dict[str, Any] = {"pid": None, "alive": False, "status": "absent", "cpu_percent": None,
                                "rss_bytes": None, "num_fds": None, "uptime_s": None}
        with self._lock:  # _on_exit closes the sentinel under it
            proc = self.proc
            if proc is None:
                return info
            info["pid"] = proc.pid
            info["uptime_s"] = round(time.monotonic() - proc.started, 3)
            if proc.exited():
                info["status"] = "exited"
                return info
        info["alive"] = True
        c = self.counters
        sampled = c.get("vital_ns")
        if c.get("vital_pid") != proc.pid or not sampled:  # its first sample comes before it is ready
            info["status"] = "starting"
            return info
        age = max(0.0, time.time() - sampled / 1e9)
        info["status"] = "running" if age < UNRESPONSIVE_AFTER else "unresponsive"
        # -1: the listener could not measure it (see Vitals); 0: not known yet.
        cpu, rss, fds, created = (c.get(k) for k in ("vital_cpu_centi", "vital_rss", "vital_fds", "vital_create_us"))
        info["cpu_percent"] = cpu / 100 if cpu >= 0 else None
        info["rss_bytes"] = rss if rss >= 0 else None
        info["num_fds"] = fds if fds >= 0 else None
        info["create_time"] = created / 1e6 if created > 0 else None
        info["sample_age_s"] = round(age, 3)
        return info

    def progress_stalled(self, written: int, waiting: int) -> bool:
        """Health is progress: records waiting while ``written`` has not moved for 2 s."""
        now = time.monotonic()
        last_written, since = self._progress
        if written != last_written or waiting <= 0:
            self._progress = (written, now)
            return False
        return now - since >= 2.0

    @property
    def degraded(self) -> bool:
        return self._degraded

    def write_health_file(self) -> None:
        if self.health is not None:
            write_health_file(self.config.health_path, self.health.report(self))


def write_health_file(path: Any, health: Dict[str, Any]) -> None:
    """Atomic replace, readable by all, writable by the owner only."""
    directory = os.path.dirname(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".health-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(health, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_health_file(path: Any) -> Dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("not a health report")
    return data


def same_process(pid: Any, create_time: Any) -> bool:
    """A pid is a process only together with its create_time (pids are reused)."""
    if not isinstance(pid, int) or not isinstance(create_time, (int, float)):
        return False
    import psutil  # the CLI's, a process of its own (never the service's)
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 0.01
    except psutil.Error:
        return False


def kernel_status(pid: Any, create_time: Any) -> Optional[str]:
    """What the kernel says of a process (``stopped``, ``disk-sleep``...), if it is still the
    one that ``pid`` and ``create_time`` name; for the CLI, of a listener that stopped answering."""
    if not same_process(pid, create_time):
        return None
    import psutil
    try:
        status = psutil.Process(pid).status()
    except psutil.Error:
        return None
    return str(getattr(status, "value", status))
