"""``RootLogging``: the main process logs through its own service, and gets its logging back.

While the service runs, the root logger of the main process has the service's
``SpoolHandler``, a level no higher than the service's, ``warnings`` captured (if asked) and
hooks that log uncaught exceptions. ``restore()`` gives every piece back as it was.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Tuple

from .._app.handler import SpoolHandler, uninstall
from .._app.process import ExceptionHooks
from .._common.config import WorkerConfig

__all__ = ["RootLogging"]


class RootLogging:
    """The main process's root logger while a service runs, and what it was before."""

    def __init__(self) -> None:
        self.handler: Optional[SpoolHandler] = None
        self._saved: Optional[Tuple[List[logging.Handler], int, bool]] = None  # pinned, level, captured
        self._hooks: Optional[ExceptionHooks] = None

    def attach(self, worker: WorkerConfig, capture_warnings: bool, flush_hook: Callable[[float], Any]) -> None:
        """Route the root logger to the service at ``worker.level``. The user's own root
        handlers keep printing what they printed: one that had no level of its own relied on
        the root's, and gets it as its own until restore() gives everything back."""
        level = worker.level
        root = logging.getLogger()
        pinned = []
        for h in root.handlers:
            if h.level == logging.NOTSET and root.level > level:
                h.setLevel(root.level)
                pinned.append(h)
        already_captured = getattr(logging, "_warnings_showwarning", None) is not None
        self._saved = (pinned, root.level, capture_warnings and not already_captured)
        self.handler = SpoolHandler(worker)
        self.handler.flush_hook = flush_hook
        self.handler.channel._attach()
        root.addHandler(self.handler)
        root.setLevel(min(level, root.level) if root.level else level)
        if capture_warnings:
            logging.captureWarnings(True)
        # Uncaught exceptions of the main process and its threads are logged, then printed.
        self._hooks = ExceptionHooks(bootstrap=False)

    def unhook(self) -> None:
        """Stop logging uncaught exceptions; the handler stays on the root."""
        if self._hooks is not None:
            self._hooks.uninstall()
            self._hooks = None

    def detach(self) -> None:
        """Only take the handler off the root (a forked copy of the main process)."""
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)

    def restore(self) -> None:
        """The root logger, its handlers' levels and ``warnings`` as they were before attach()."""
        self.unhook()
        root = logging.getLogger()
        if self.handler is not None:
            uninstall(self.handler)
            root.removeHandler(self.handler)
        if self._saved is not None:
            pinned, level, captured = self._saved
            root.setLevel(level)
            for h in pinned:
                h.setLevel(logging.NOTSET)
            if captured:  # only if we turned it on: the user's own captureWarnings(True) stays
                logging.captureWarnings(False)
            self._saved = None
