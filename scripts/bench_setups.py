"""The benchmark's setups: how each way of logging from several processes is set up in a worker
(``worker_setup``, what a pool initializer would do) and in the coordinator process (one ``Setup``
class per peer: start it, hand the workers what they need, drain it, verify its files, stop it).
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench_verify import (LOGGER_NAME, LOGURU_MSG, LOGURU_WARM_MSG, MSG, WARM_MSG, WARMUP, add_verifications,
                          verify_lines, verify_mplog_full, verify_mplog_simple)

FMT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
LOGURU_FMT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level} {process.name} {name}: {message}"


# ----------------------------------------------------------------------------------------------
# Worker side (module level: must be importable under spawn and forkserver)
# ----------------------------------------------------------------------------------------------
def _set_root(handler: Optional[logging.Handler]) -> None:
    # A forked child inherits the parent's root handlers: replace them, do not add to them.
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    if handler is not None:
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def _file_handler(path: str) -> logging.Handler:
    handler = logging.FileHandler(path, "a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FMT))
    return handler


def worker_setup(setup: str, arg: Any) -> Tuple[Callable[..., Any], str, str, Callable[[], None]]:
    """What a pool initializer would do for ``setup``. Returns (log call, message, warm-up
    message, finalize). ``finalize`` runs after the last call and is inside the timed window
    (it pushes out whatever the process still buffers)."""
    info = logging.getLogger(LOGGER_NAME).info
    nothing: Callable[[], None] = lambda: None
    if setup == "floor":
        _set_root(logging.NullHandler())
        return info, MSG, WARM_MSG, nothing
    if setup == "filehandler":
        handler = _file_handler(arg)
        _set_root(handler)

        def close() -> None:
            handler.flush()
            handler.close()
        return info, MSG, WARM_MSG, close
    if setup in ("stdlib-queue", "stdlib-cookbook"):
        queue = arg
        _set_root(logging.handlers.QueueHandler(queue))

        def drain_feeder() -> None:
            queue.close()
            queue.join_thread()  # the feeder thread has written everything to the pipe
        return info, MSG, WARM_MSG, drain_feeder
    if setup in ("mplog", "mplog-python"):
        import mplog
        arg["initializer"](*arg["initargs"])  # svc.pool_kwargs(), as a Pool would call it
        if mplog.current_config() is None:
            raise RuntimeError("mplog.worker_init did not install the handler (see stderr)")
        return info, MSG, WARM_MSG, nothing
    if setup == "loguru":
        logger = arg  # the parent's logger (inherited under fork, pickled under spawn)
        return logger.info, LOGURU_MSG, LOGURU_WARM_MSG, nothing  # SimpleQueue.put is synchronous
    if setup == "concurrent-log-handler":
        from concurrent_log_handler import ConcurrentRotatingFileHandler
        handler = ConcurrentRotatingFileHandler(arg, "a", maxBytes=0, backupCount=0, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FMT))
        _set_root(handler)
        return info, MSG, WARM_MSG, handler.close
    if setup == "multiprocessing-logging":
        from multiprocessing_logging import MultiProcessingHandler
        mp_handlers = [h for h in logging.getLogger().handlers if isinstance(h, MultiProcessingHandler)]
        if not mp_handlers:
            raise RuntimeError("no MultiProcessingHandler inherited (multiprocessing-logging needs fork)")
        queue = mp_handlers[0].queue

        def drain_feeder_mpl() -> None:
            queue.close()
            queue.join_thread()
        return info, MSG, WARM_MSG, drain_feeder_mpl
    raise ValueError(f"unknown setup {setup!r}")



def cookbook_listener(queue: Any, path: str, drained: Any, release: Any, timeout: float) -> None:
    """The logging cookbook's listener process: read records from the queue, handle them."""
    handler = _file_handler(path)
    _set_root(handler)
    while True:
        record = queue.get()
        if record is None:  # the sentinel
            break
        logging.getLogger(record.name).handle(record)
    handler.flush()
    drained.set()
    release.wait(timeout)  # stay alive so the coordinator can read our CPU and peak RSS
    handler.close()



# ----------------------------------------------------------------------------------------------
# Coordinator side: one class per setup
# ----------------------------------------------------------------------------------------------
def call_with_timeout(fn: Callable[[], Any], timeout: float) -> Tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (finished, result or exception)."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: B036
            box["error"] = exc
    thread = threading.Thread(target=run, name="bench-call", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout))
    if thread.is_alive():
        return False, None
    if "error" in box:
        return True, box["error"]
    return True, box.get("result")


class Setup:
    writer = "workers"  # "workers", "thread" (in the coordinator) or "process"

    def __init__(self, name: str, ctx: Any, tmp: str, procs: int, n: int) -> None:
        self.name = name
        self.ctx = ctx
        self.tmp = tmp
        self.procs = procs
        self.n = n
        self.path = os.path.join(tmp, "bench.log")
        self.notes: List[str] = []
        self.extra: Dict[str, Any] = {}

    def start(self, deadline: float) -> None:
        pass

    def worker_arg(self) -> Any:
        return self.path

    def settle(self, deadline: float) -> None:
        time.sleep(0.5)  # let the writer take the warm-up records

    def writer_pid(self) -> Optional[int]:
        return None

    def drain(self, deadline: float) -> None:
        """Return once every record is in the file; raise on failure or timeout."""

    def verify(self, pids: Dict[int, int]) -> Optional[Dict[str, Any]]:
        return add_verifications({"log": verify_lines(self.path, self.procs, self.n, LOGGER_NAME)})

    def stop(self, deadline: float) -> None:
        pass


class Floor(Setup):
    def worker_arg(self) -> Any:
        return None

    def settle(self, deadline: float) -> None:
        time.sleep(0.2)

    def verify(self, pids: Dict[int, int]) -> Optional[Dict[str, Any]]:
        return None


class FileHandlerSetup(Setup):
    pass


class ConcurrentLogHandlerSetup(Setup):
    pass


class StdlibQueue(Setup):
    writer = "thread"

    def start(self, deadline: float) -> None:
        self.queue = self.ctx.Queue()
        self.handler = _file_handler(self.path)
        self.listener = logging.handlers.QueueListener(self.queue, self.handler)
        self.listener.start()

    def worker_arg(self) -> Any:
        return self.queue

    def drain(self, deadline: float) -> None:
        done, err = call_with_timeout(self.listener.stop, deadline - time.monotonic())
        if not done:
            raise TimeoutError("QueueListener did not drain before the timeout")
        if isinstance(err, BaseException):
            raise err
        self.handler.flush()

    def stop(self, deadline: float) -> None:
        self.handler.close()


class StdlibCookbook(Setup):
    writer = "process"

    def start(self, deadline: float) -> None:
        self.queue = self.ctx.Queue()
        self.drained = self.ctx.Event()
        self.release = self.ctx.Event()
        self.proc = self.ctx.Process(target=cookbook_listener, name="bench-listener",
                                     args=(self.queue, self.path, self.drained, self.release,
                                           max(1.0, deadline - time.monotonic())))
        self.proc.start()

    def worker_arg(self) -> Any:
        return self.queue

    def writer_pid(self) -> Optional[int]:
        return self.proc.pid

    def drain(self, deadline: float) -> None:
        self.queue.put(None)
        if not self.drained.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the cookbook listener process did not drain before the timeout")

    def stop(self, deadline: float) -> None:
        self.release.set()
        self.proc.join(max(1.0, min(10.0, deadline - time.monotonic())))
        if self.proc.is_alive():  # it never got the sentinel (a failed run): end it
            self.proc.kill()
            self.proc.join(2.0)
            self.notes.append("killed the cookbook listener process")
        elif self.proc.exitcode != 0:
            self.notes.append(f"cookbook listener exit code {self.proc.exitcode}")
        self.queue.cancel_join_thread()  # never hang at exit on the sentinel's feeder


class MplogSetup(Setup):
    writer = "process"
    _pids: Dict[int, int] = {}
    _at_flush: Tuple[int, int, int] = (0, 0, 0)

    def start(self, deadline: float) -> None:
        import mplog
        self.svc = mplog.LogService(self.tmp, name="bench", level="INFO", overflow="block")
        self.svc.start()
        self.simple_path = str(self.svc.simplified_path)
        self.full_path = str(self.svc.full_path)
        health = self.svc.health()
        self.listener_pid = health["listener"]["pid"]
        self.spool = health["queue"].get("spool")

    def worker_arg(self) -> Any:
        return self.svc.pool_kwargs()

    def settle(self, deadline: float) -> None:
        if not self.svc.flush(timeout=max(1.0, deadline - time.monotonic())):
            raise TimeoutError("mplog flush (after warm-up) returned False")
        time.sleep(0.2)

    def writer_pid(self) -> Optional[int]:
        return self.listener_pid

    def drain(self, deadline: float) -> None:
        if not self.svc.flush(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("svc.flush() returned False before the timeout")

    def verify(self, pids: Dict[int, int]) -> Optional[Dict[str, Any]]:
        health = self.svc.health()
        self.extra["health_at_flush"] = {"records": health.get("records"), "restarts": health.get("restarts"),
                                         "status": health.get("status"), "queue": health.get("queue"),
                                         "listener_pid": health.get("listener", {}).get("pid")}
        if health.get("listener", {}).get("pid") != self.listener_pid or health.get("restarts"):
            self.notes.append(f"listener changed during the run: restarts={health.get('restarts')}, "
                              f"last_exit={health.get('last_exit')}")
        self._pids = pids
        full, firsts = verify_mplog_full(self.full_path, self.procs, self.n, pids)
        simple = verify_mplog_simple(self.simple_path, self.procs, self.n, firsts)
        total = add_verifications({"full": full, "simplified": simple})
        self._at_flush = (total["lost"], total["dup"], total["torn"])
        return total

    def stop(self, deadline: float) -> None:
        final = self.svc.stop()
        self.extra["health_final"] = {"records": final.get("records"), "restarts": final.get("restarts"),
                                      "last_exit": final.get("last_exit")}
        rec = final.get("records", {})
        if self.spool and os.path.exists(self.spool):
            self.notes.append(f"the spool is still there after stop(): {self.spool} "
                              f"(spool_kept={final.get('spool_kept')!r}, kept_in_spool={rec.get('kept_in_spool')})")
        if not self._pids:  # the run failed before verification: nothing to compare
            self.notes.append(f"mplog final health after the failed run (workers killed): sent={rec.get('sent')} "
                              f"written={rec.get('written')} dropped={rec.get('dropped')} lost={rec.get('lost')}")
            return
        # Once more after stop(): the files must still hold every record exactly once (and the
        # listener's closing notice must be well-formed).
        full, firsts = verify_mplog_full(self.full_path, self.procs, self.n, self._pids)
        simple = verify_mplog_simple(self.simple_path, self.procs, self.n, firsts)
        after = add_verifications({"full": full, "simplified": simple})
        self.extra["verify_after_stop"] = after
        if (after["lost"], after["dup"], after["torn"]) != self._at_flush:
            self.notes.append(f"after stop(): lost/dup/torn {after['lost']}/{after['dup']}/{after['torn']} "
                              f"(at flush: {'/'.join(map(str, self._at_flush))}); "
                              f"full {full['bad_examples']} simplified {simple['bad_examples']}")
        expected = self.procs * (self.n + WARMUP)
        if rec.get("written") != expected or rec.get("dropped") or rec.get("lost"):
            self.notes.append(f"mplog final health: sent={rec.get('sent')} written={rec.get('written')} "
                              f"dropped={rec.get('dropped')} lost={rec.get('lost')} (expected {expected})")


class MplogPythonSetup(MplogSetup):
    """MplogSetup without the compiled code: every ring and handler is opened with
    MPLOG_PURE_PYTHON=1 (the listener and the workers inherit the environment)."""

    def start(self, deadline: float) -> None:
        os.environ["MPLOG_PURE_PYTHON"] = "1"
        super().start(deadline)

    def stop(self, deadline: float) -> None:
        try:
            super().stop(deadline)
        finally:
            os.environ.pop("MPLOG_PURE_PYTHON", None)


class LoguruSetup(Setup):
    writer = "thread"

    def start(self, deadline: float) -> None:
        from loguru import logger
        logger.remove()
        self.logger = logger
        self.hid = logger.add(self.path, format=LOGURU_FMT, level="INFO", enqueue=True, colorize=False,
                              context=self.ctx)

    def worker_arg(self) -> Any:
        return self.logger

    def settle(self, deadline: float) -> None:
        done, _ = call_with_timeout(self.logger.complete, deadline - time.monotonic())
        if not done:
            raise TimeoutError("loguru complete() (after warm-up) did not return")
        time.sleep(0.2)

    def drain(self, deadline: float) -> None:
        done, err = call_with_timeout(self.logger.complete, deadline - time.monotonic())
        if not done:
            raise TimeoutError("loguru complete() did not return before the timeout")
        if isinstance(err, BaseException):
            raise err

    def verify(self, pids: Dict[int, int]) -> Optional[Dict[str, Any]]:
        # loguru's {name} is the caller's module (__main__ / __mp_main__): don't check it.
        return add_verifications({"log": verify_lines(self.path, self.procs, self.n, None)})

    def stop(self, deadline: float) -> None:
        call_with_timeout(lambda: self.logger.remove(self.hid), max(0.1, deadline - time.monotonic()))


class MultiprocessingLogging(Setup):
    writer = "thread"

    def start(self, deadline: float) -> None:
        import multiprocessing_logging
        if multiprocessing.get_start_method(allow_none=True) != "fork":
            multiprocessing.set_start_method("fork", force=True)  # its install() checks the global
        self.handler = _file_handler(self.path)
        _set_root(self.handler)
        multiprocessing_logging.install_mp_handler()
        self.mp_handler = [h for h in logging.getLogger().handlers
                           if isinstance(h, multiprocessing_logging.MultiProcessingHandler)][0]

    def worker_arg(self) -> Any:
        return None

    def drain(self, deadline: float) -> None:
        # Its close() joins the receiver for at most 5 s and then closes the file under it;
        # do what close() does, with our own deadline.
        self.mp_handler._is_closed = True
        self.mp_handler._receive_thread.join(max(0.0, deadline - time.monotonic()))
        if self.mp_handler._receive_thread.is_alive():
            raise TimeoutError("the multiprocessing-logging receiver did not drain before the timeout")
        self.handler.flush()

    def stop(self, deadline: float) -> None:
        _set_root(None)
        self.handler.close()


SETUP_CLASSES = {
    "floor": Floor, "filehandler": FileHandlerSetup, "stdlib-queue": StdlibQueue,
    "stdlib-cookbook": StdlibCookbook, "mplog": MplogSetup, "loguru": LoguruSetup,
    "mplog-python": MplogPythonSetup,
    "concurrent-log-handler": ConcurrentLogHandlerSetup, "multiprocessing-logging": MultiprocessingLogging,
}

