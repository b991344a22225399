"""How the main process's end stops its service: ``ExitHook`` at interpreter exit, and
``StopSignals`` on SIGTERM or SIGINT when the application opts in.

At exit the service is stopped last, after every atexit function and every other handler's
close: ``ExitHook`` waits for non-daemon children, then puts a marker first in
``logging._handlerList`` (``_StopAtShutdown``), which the ``logging.shutdown()`` registered at
logging's import closes last.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
import weakref
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["ExitHook", "StopSignals"]


class ExitHook:
    """The service's atexit function. ``stop`` stops the service without restoring the root
    logger; ``foreign`` is True in a forked copy of the main process (not its service)."""

    def __init__(self, stop: Callable[[], Any], foreign: Callable[[], bool], exit_timeout: float) -> None:
        self._stop = stop
        self._foreign = foreign
        self._exit_timeout = exit_timeout
        self._marker: Optional[logging.Handler] = None  # logging's list holds a weak reference only

    def register(self) -> None:
        atexit.register(self._at_exit)

    def unregister(self) -> None:
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        # atexit runs last-registered-first, and logging registered its shutdown() when it was
        # imported, before any service: the standard library's handlers still write what every
        # atexit function logs. Stopping here would lose what the functions registered before
        # start() log. So here (before multiprocessing's exit function, registered earlier,
        # terminates daemonic children) wait for non-daemon children, bounded, as Python would
        # after us; then leave the stop to logging.shutdown(), through a handler it closes last.
        if self._foreign():
            return  # a forked child's exit (3.13+ runs atexit there): not this process's service
        try:
            _join_children(time.monotonic() + self._exit_timeout)
        except Exception:
            pass
        if not self._stop_with_logging_shutdown():
            self.stop_now()

    def stop_now(self) -> None:
        try:
            self._stop()
        except Exception as exc:
            try:
                os.write(2, f"mplog: stopping at exit failed: {exc}\n".encode())
            except OSError:
                pass

    def _stop_with_logging_shutdown(self) -> bool:
        """Have logging's own exit-time shutdown stop the service last (see _at_exit). False
        where logging keeps no such list (then the caller stops now)."""
        handlers = getattr(logging, "_handlerList", None)
        if not isinstance(handlers, list):
            return False
        marker = _StopAtShutdown(self)  # appends a weak reference to itself: move it to the front
        self._marker = marker
        lock = getattr(logging, "_lock", None)  # logging's module lock (3.6+), around its list
        with lock if lock is not None else contextlib.nullcontext():
            for i, ref in enumerate(handlers):
                if ref() is marker:
                    del handlers[i]
                    break
            handlers.insert(0, weakref.ref(marker))
        return True


class _StopAtShutdown(logging.Handler):
    """Not a handler of any logger: a place in ``logging._handlerList``, first, so that the
    ``logging.shutdown()`` that runs at exit closes it after every other handler, once every
    atexit function has run. Closing it stops the service."""

    def __init__(self, hook: ExitHook) -> None:
        super().__init__()
        self.hook: Optional[ExitHook] = hook

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - on no logger
        pass

    def close(self) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook.stop_now()
        super().close()


def _join_children(deadline: float) -> None:
    import multiprocessing
    for child in multiprocessing.active_children():
        if not child.daemon:
            child.join(max(0.0, deadline - time.monotonic()))


class StopSignals:
    """Signal handlers that stop the service, then let the signal do what it did before."""

    def __init__(self) -> None:
        self._saved: List[Tuple[int, Any]] = []

    def install(self, stop: Callable[[], Any], signals: Any = None) -> None:
        """On each of ``signals`` (SIGTERM and SIGINT by default), call ``stop``; then SIGINT
        raises KeyboardInterrupt, SIGTERM ends the process with the usual status."""
        import signal as _signal
        chosen = signals if signals is not None else (_signal.SIGTERM, _signal.SIGINT)
        for signum in chosen:
            previous = _signal.getsignal(signum)

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                stop()
                if callable(previous):
                    previous(num, frame)  # default_int_handler raises KeyboardInterrupt
                elif previous != _signal.SIG_IGN:
                    _signal.signal(num, _signal.SIG_DFL)
                    os.kill(os.getpid(), num)

            _signal.signal(signum, handler)
            self._saved.append((signum, previous))

    def restore(self) -> None:
        """The handlers install() replaced, where they are still ours."""
        import signal as _signal
        while self._saved:
            signum, previous = self._saved.pop()
            try:
                if _signal.getsignal(signum) is not previous:
                    _signal.signal(signum, previous if previous is not None else _signal.SIG_DFL)
            except (ValueError, OSError):  # not the main thread: leave it
                pass
