"""mplog: multiprocess logging that is safe, fast and honest.

Every process publishes records into its own ring in the service's spool; a single listener
process owns the two log files; a supervisor in the main process restarts the listener if it dies and reports health.
See the README for the design and every option.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._common.worker_config import WorkerConfig
from ._supervisor.console import progress
from ._app.handler import MPQueueHandler, ServiceQueue, SpoolHandler, context, current_config, pool_kwargs, worker_init

if TYPE_CHECKING:  # pragma: no cover
    from ._supervisor.service import LogService, ServiceHandler

__all__ = [
    "LogService",
    "MPQueueHandler",
    "ServiceHandler",
    "ServiceQueue",
    "SpoolHandler",
    "WorkerConfig",
    "__version__",
    "context",
    "current_config",
    "pool_kwargs",
    "progress",
    "worker_init",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Workers import this package to run worker_init; they should not pay for the service side
    # (psutil, subprocess). The main process gets LogService on first use.
    if name in ("LogService", "ServiceHandler"):
        from ._supervisor import service as _service
        return getattr(_service, name)
    raise AttributeError(f"module 'mplog' has no attribute {name!r}")
