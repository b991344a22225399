"""A Django-style settings module for tests/test_frameworks.py: a module-level ``LOGGING`` dict
that every process applies with ``dictConfig`` (the parent, and each worker in its initializer),
as ``django.setup()`` does. The directory is relative, as a project's would be: every process
of the application (spawn and forkserver children get the parent's working directory with their
preparation data) builds the same dict."""

from __future__ import annotations

import logging
import logging.config
import os
from typing import Tuple

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
    "handlers": {
        "mplog": {"class": "mplog.ServiceHandler", "directory": "logs", "name": "run",
                  "shutdown_timeout": 10.0},
    },
    "root": {"handlers": ["mplog"], "level": "INFO"},
}


def setup() -> None:
    """What ``django.setup()`` does with ``settings.LOGGING``; also the pools' initializer."""
    logging.config.dictConfig(LOGGING)


def console_only(path: str) -> None:
    """A child's LOGGING of its own (one file handler standing for a console)."""
    logging.config.dictConfig({
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"own": {"class": "logging.FileHandler", "filename": path, "formatter": "plain"}},
        "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
        "root": {"handlers": ["own"], "level": "INFO"},
    })


def log_items(args: Tuple[str, int]) -> int:
    """Log ``n`` numbered records; return the pid."""
    tag, n = args
    log = logging.getLogger("fw.worker")
    for i in range(n):
        log.info("%s item %d", tag, i)
    return os.getpid()


def configured_process(tag: str, n: int) -> None:
    """A plain Process target that applies the settings first, as a Django command would."""
    setup()
    log_items((tag, n))
    for h in logging.getLogger().handlers:
        h.flush()


def own_config_child(path: str, n: int) -> None:
    """A child that applies a LOGGING of its own (the inherited ServiceHandler is closed)."""
    console_only(path)
    log_items(("child", n))
