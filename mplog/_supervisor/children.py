"""``ChildCapture``: while a service runs, pool workers made without mplog's initializer
(joblib, Dask, spawn and forkserver pools) log to it too (issue 13; see _app/capture.py).

The service publishes its worker config in the capture directory and withdraws it at stop;
workers that were already running when it started cannot be captured, and are named in a
notice.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

from .._app.capture import ENV as CAPTURE_ENV
from .._app.capture import capture_dir, disabled_by_env, publish, withdraw
from .._common.config import ServiceConfig, WorkerConfig

__all__ = ["ChildCapture"]


class ChildCapture:
    """The capture of one service's pool workers: published, withdrawn, strays named."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self._asked = cfg.capture_children
        self._strays_possible = False
        self._dir: Optional[str] = None
        self._service_id = ""

    def enabled(self) -> bool:
        return self._asked and not disabled_by_env()

    def look_for_strays(self) -> None:
        """Before the listener, our own child, is one: whether pool workers started before the
        service may be children already."""
        self._strays_possible = self.enabled() and _has_children()

    def path(self) -> Optional[str]:
        """The capture directory the listener is told of (None if there is none)."""
        if not self.enabled():
            return None
        try:
            return capture_dir()
        except OSError:
            return None  # publish() says why, as a notice

    def publish(self, worker: WorkerConfig, notice: Callable[[str], None]) -> None:
        """Offer ``worker`` to pool workers made from now on; ``notice`` what cannot be captured."""
        try:
            self._dir = publish(worker)
        except OSError as exc:
            notice(f"pool workers made without mplog's initializer will not log here: the capture "
                   f"directory cannot be written ({exc})")
            return
        self._service_id = worker.service_id
        strays = _uncaptured_workers(self._dir) if self._strays_possible else []
        if strays:
            shown = ", ".join(f"{pid} ({kind})" for pid, kind in strays[:10])
            more = f" and {len(strays) - 10} more" if len(strays) > 10 else ""
            notice(f"{len(strays)} pool worker process(es) started before this service cannot log to it: "
                   f"{shown}{more}. Their records go where logging sends them without mplog. Start the "
                   f"pool after the service, or pass svc.pool_kwargs() (joblib: call "
                   f"get_reusable_executor().shutdown() from joblib.externals.loky first)")

    def withdraw(self) -> None:
        """No new child joins the service. Idempotent."""
        if self._dir is not None:
            withdraw(self._service_id)
            self._dir = None


def _pool_worker_kind(cmdline: List[str]) -> Optional[str]:
    for flag, value in zip(cmdline, cmdline[1:]):
        if flag == "-c" and value.lstrip().startswith("from multiprocessing.spawn import spawn_main"):
            return "multiprocessing spawn worker"
        if flag == "-m" and value.endswith("loky.backend.popen_loky_posix"):
            return "loky worker"
    return None


def _has_children() -> bool:
    """Whether this process has a child, without reaping one: the cheap question that spares
    psutil (1.0 MB in the main process, and so in every forked worker) when it has none."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    except (AttributeError, OSError):  # no waitid here: ask psutil
        pass
    return True


def _uncaptured_workers(capture_dir: str) -> List[Tuple[int, str]]:
    """This process's pool workers (spawn children, loky workers, at any depth) that were not
    started under a capture of this process: nothing routes their records to a service."""
    try:
        import psutil
        children = psutil.Process().children(recursive=True)
    except Exception:
        return []
    found = []
    for child in children:
        try:
            kind = _pool_worker_kind(child.cmdline())
            if kind is None:
                continue
            # The environment it was started with: a worker captured by an earlier service of
            # this process follows this one.
            if child.environ().get(CAPTURE_ENV, "").partition(":")[2] == capture_dir:
                continue
        except Exception:  # gone, or not ours to read
            continue
        found.append((child.pid, kind))
    return found
