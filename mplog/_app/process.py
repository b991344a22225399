"""The worker side of "why did my worker die?": what a process leaves for the listener to read.

Only a process's parent can wait for it, and a nested pool's grandchildren are not the main
process's children; a process killed by SIGKILL or ``os._exit()`` runs nothing at all. So each
process of a service (every one but the main process that owns it) leaves evidence where the
listener can read it after its death, and the listener (``_exits``) puts it together:

* **who**: its pid, start time and name, in its counter slot (written at the claim);
* **a clean exit**: ``X_CLEAN`` in its slot's ``wstate`` word, set by an exit hook. The hook is a
  ``multiprocessing.util.Finalize`` (multiprocessing's exit function runs it in every child: in
  fork and forkserver children before 3.13, where ``atexit`` never runs (gh-83856), and after)
  and an ``atexit`` hook (a process that is not a multiprocessing child). A process that died
  without it died abnormally; one with it and a non-zero status exited with that status;
* **a crash in C code**: ``faulthandler`` points at ``fault.<slot>`` in the spool, so a SIGSEGV,
  SIGABRT, SIGBUS, SIGFPE or SIGILL leaves the Python stacks of all its threads there;
* **uncaught exceptions**: ``threading.excepthook`` and ``sys.excepthook`` are chained, and so
  is the one place multiprocessing prints a ``Process`` target's traceback (``_bootstrap``
  calls ``traceback.print_exc()`` and offers no hook): the exception is logged to
  ``py.exceptions`` with its traceback, then printed as before;
* **its output**, with ``capture_output`` (see ``_capture``).

All of it is set up once per process, when it claims its slot; nothing here runs per record.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import sys
import threading
from typing import Any, Callable, List, Optional

from .._common.counters import (S_WATCHED, S_WSTATE, STATE_STOPPED, STATE_STOPPING, W_CAPTURE, W_FAULTS, X_CLEAN, X_CODE_KNOWN, X_CODE_SHIFT,
                        X_UNCAUGHT, Counters, Slot)

__all__ = ["ExceptionHooks", "after_fork_in_child", "err_fd", "process_name", "watch"]

UNCAUGHT_LOGGER = "py.exceptions"


def process_name() -> str:
    """The name ``logging`` gives this process (``LogRecord.processName``)."""
    mp = sys.modules.get("multiprocessing")
    if mp is not None:
        try:
            return str(mp.current_process().name)
        except Exception:
            pass
    return "MainProcess"


def _exit_code_in_bootstrap() -> Optional[int]:
    """This process's exit status, if known now: inside ``BaseProcess._bootstrap``'s ``finally``
    (3.9-3.12 run multiprocessing's exit function there), from the exception in flight, exactly
    as ``_bootstrap`` will compute it. Elsewhere (3.13, atexit): None."""
    proc = sys.modules.get("multiprocessing.process")
    if proc is None:
        return None
    code = proc.BaseProcess._bootstrap.__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return None
    exc = sys.exc_info()[1]
    if exc is None:
        return 0
    if isinstance(exc, SystemExit):
        if exc.code is None:
            return 0
        return exc.code & 0xFF if isinstance(exc.code, int) else 1
    return 1


class _Watch:
    """This process's part: its slot, its fault file, its capture, its exit hook."""

    def __init__(self, slot: Slot, runtime: str, capture: bool) -> None:
        self.pid = os.getpid()
        self.slot = slot
        self.fault_fd = -1
        self.capture: Any = None
        self.exited = False
        state = 0
        try:
            fd = os.open(os.path.join(runtime, f"fault.{slot.index}"),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            faulthandler.enable(file=fd, all_threads=True)
            self.fault_fd = fd
            state |= W_FAULTS
        except (OSError, ValueError, RuntimeError):
            pass
        if capture:
            from .output import Capture
            try:
                self.capture = Capture(runtime, slot.index)
                state |= W_CAPTURE
            except OSError as exc:
                _say(f"mplog: cannot capture the output of process {self.pid}: {exc}\n")
        slot.set(S_WSTATE, slot.get(S_WSTATE) | state)
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:
            # Negative priority: after the process's own children are joined (a nested pool).
            mp_util.Finalize(None, self.at_exit, exitpriority=-100)
        atexit.register(self.at_exit)

    def at_exit(self) -> None:
        """The process is exiting normally: write what is still captured, then say so."""
        if self.exited or os.getpid() != self.pid:  # run once; never in a forked child
            return
        self.exited = True
        code = _exit_code_in_bootstrap()
        if self.capture is not None:
            try:
                self.capture.stop()
            except Exception:
                pass
            self.capture = None
        mark = X_CLEAN if code is None else X_CLEAN | X_CODE_KNOWN | (code << X_CODE_SHIFT)
        slot = self.slot
        slot.set(S_WSTATE, slot.get(S_WSTATE) | mark)

    def uncaught(self) -> None:
        slot = self.slot
        slot.set(S_WSTATE, slot.get(S_WSTATE) | X_UNCAUGHT)

    def forget_in_child(self) -> None:
        """A forked child: the fault file and the capture are the parent's; the child makes
        its own when it claims a slot."""
        if self.fault_fd >= 0:
            try:
                faulthandler.disable()
                os.close(self.fault_fd)
            except (OSError, ValueError):
                pass
            self.fault_fd = -1
        if self.capture is not None:
            self.capture.forget_in_child()
            self.capture = None
        self.exited = True  # its hooks, if inherited, do nothing here


_watches: List[_Watch] = []  # this process's (one per service it logs to)


def watch(slot: Slot, runtime: str, capture: bool) -> None:
    """Called once per process and service, when the process claims its slot (not in the main
    process that owns the service). Never raises."""
    try:
        if any(w.pid == os.getpid() for w in _watches):
            ExceptionHooks.install_in_process()  # a capture at start came before _bootstrap
            return  # faulthandler has one file, and the exit hook one slot to mark: the first
        _watches.append(_Watch(slot, runtime, capture))
        ExceptionHooks.install_in_process()
    except Exception as exc:
        _say(f"mplog: cannot watch process {os.getpid()}: {type(exc).__name__}: {exc}\n")


def wait_watched(slot: Slot, counters: Counters, timeout: float) -> bool:
    """Wait until the listener watches this process (it rang the doorbell when it claimed its
    slot), for ``timeout`` seconds at most, and only while the service runs. True if it does."""
    import time
    deadline = time.monotonic() + timeout
    pause = 0.0001
    while not slot.get(S_WATCHED):
        if counters.get("state") in (STATE_STOPPING, STATE_STOPPED) or time.monotonic() >= deadline:
            return False
        time.sleep(pause)  # a bounded wait on a word the listener sets
        pause = min(pause * 2, 0.002)
    return True


def after_fork_in_child() -> None:
    me = os.getpid()
    for w in _watches:
        if w.pid != me:
            w.forget_in_child()
    _watches[:] = [w for w in _watches if w.pid == me]


def err_fd() -> int:
    """Where mplog's own messages go in this process: its stderr, or the stderr it had before
    its output was captured (a captured line that mplog diverted must not be captured again)."""
    for w in _watches:
        if w.capture is not None and w.pid == os.getpid():
            return int(w.capture.saved_err)
    return 2


def _say(text: str) -> None:
    try:
        os.write(err_fd(), text.encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _log_uncaught(where: str, exc_info: Any) -> None:
    try:
        level = logging.WARNING if issubclass(exc_info[0], KeyboardInterrupt) else logging.ERROR
        logging.getLogger(UNCAUGHT_LOGGER).log(level, "uncaught exception in %s", where, exc_info=exc_info)
    except Exception:
        pass  # logging never raises into the caller; the usual traceback is printed anyway


class ExceptionHooks:
    """``sys.excepthook``, ``threading.excepthook`` and multiprocessing's print of a Process
    target's traceback, each logging the exception, then doing what it did before. A hook that
    is already ours (inherited through fork) is left as it is: one record per exception."""

    _in_process: Optional["ExceptionHooks"] = None  # the workers' set, once per process

    def __init__(self, bootstrap: bool) -> None:
        self.pid = os.getpid()
        self.prev_sys: Optional[Callable[..., Any]] = None
        self.prev_thread: Optional[Callable[..., Any]] = None
        self.prev_print_exc: Optional[Callable[..., Any]] = None
        if not _ours(sys.excepthook):
            self.prev_sys = sys.excepthook
            sys.excepthook = self.sys_hook
        if not _ours(threading.excepthook):
            self.prev_thread = threading.excepthook
            threading.excepthook = self.thread_hook
        if bootstrap:
            self.hook_print_exc()

    def hook_print_exc(self) -> None:
        # Only inside a multiprocessing child's _bootstrap (parent_process() is set there): a
        # process captured at its start (_capture) got its other hooks before that.
        import traceback
        proc = sys.modules.get("multiprocessing.process")
        if (self.prev_print_exc is None and proc is not None and proc.parent_process() is not None
                and not _ours(traceback.print_exc)):
            self.prev_print_exc = traceback.print_exc
            traceback.print_exc = self.print_exc  # type: ignore[assignment]

    @classmethod
    def install_in_process(cls) -> None:
        hooks = cls._in_process
        if hooks is None or hooks.pid != os.getpid():
            cls._in_process = cls(bootstrap=True)
        else:
            hooks.hook_print_exc()

    def sys_hook(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _log_uncaught(f"{process_name()} (pid {os.getpid()})", (exc_type, exc, tb))
        assert self.prev_sys is not None
        self.prev_sys(exc_type, exc, tb)

    def thread_hook(self, args: Any) -> None:
        if args.exc_type is not SystemExit:  # threading ignores SystemExit; so do we
            name = args.thread.name if args.thread is not None else "a thread"
            _log_uncaught(f"thread {name} of {process_name()} (pid {os.getpid()})",
                          (args.exc_type, args.exc_value, args.exc_traceback))
        assert self.prev_thread is not None
        self.prev_thread(args)

    def print_exc(self, *args: Any, **kwargs: Any) -> None:
        proc = sys.modules.get("multiprocessing.process")
        frame = sys._getframe(1)
        if (proc is not None and frame.f_code is proc.BaseProcess._bootstrap.__code__
                and not args and not kwargs and sys.exc_info()[0] is not None):
            _log_uncaught(f"the target of {process_name()} (pid {os.getpid()}), which exits with status 1",
                          sys.exc_info())
            for w in _watches:
                if w.pid == os.getpid():
                    w.uncaught()
        assert self.prev_print_exc is not None
        self.prev_print_exc(*args, **kwargs)

    def uninstall(self) -> None:
        """Put back what was there, where it is still ours (another library may have chained
        its own hook after ours since)."""
        if self.prev_sys is not None and sys.excepthook == self.sys_hook:
            sys.excepthook = self.prev_sys
        if self.prev_thread is not None and threading.excepthook == self.thread_hook:
            threading.excepthook = self.prev_thread
        if self.prev_print_exc is not None:
            import traceback
            if traceback.print_exc == self.print_exc:
                traceback.print_exc = self.prev_print_exc  # type: ignore[assignment]


def _ours(hook: Any) -> bool:
    return isinstance(getattr(hook, "__self__", None), ExceptionHooks)
