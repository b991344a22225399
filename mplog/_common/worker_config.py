"""The worker's share of the configuration: what a process needs to log into a running
service. Its own module, without ``dataclasses`` (which imports ``inspect``, ``ast`` and ``dis``:
about 1 MB in every worker), because every process of the service imports it."""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, NamedTuple, Tuple, Union

__all__ = ["WorkerConfig", "coerce"]


class WorkerConfig(NamedTuple):
    """What a process needs to log into a running service. Plain data: pickles everywhere, and
    survives ``json`` (a scheduler can pass it in an environment variable). Immutable; change a
    copy with ``_replace``."""

    fifo_path: str
    counters_path: str
    level: int
    overflow: str
    overflow_timeout: float
    capture_warnings: bool
    service_id: str
    simplified_level: int = logging.INFO
    # The ring in the spool: at most ``queue_size`` records in ``ring_bytes`` (0: the default
    # for queue_size, _spool.ring_capacity).
    queue_size: int = 10000
    ring_bytes: int = 0
    # Levels of named loggers in the main process when this config was made (pool_kwargs()).
    levels: Tuple[Tuple[str, int], ...] = ()
    flush_timeout: float = 5.0
    # The main process that owns the service: every other process is watched (see _process).
    owner_pid: int = 0
    capture_output: bool = False  # fd 1 and 2 of each worker become records (see _output)
    # The files use the default formats: a common record carries only the fields they print
    # (_record.LEAN_KEYS), not funcName, threadName, thread, relativeCreated.
    lean: bool = False

    def to_json(self) -> str:
        return json.dumps(self._asdict())

    @classmethod
    def from_json(cls, text: str) -> "WorkerConfig":
        return coerce(json.loads(text))


def coerce(config: Union[WorkerConfig, str, Dict[str, Any]]) -> WorkerConfig:
    """A WorkerConfig from itself, its JSON or a dict of its fields (levels as lists, from JSON)."""
    if isinstance(config, WorkerConfig):
        return config
    if isinstance(config, str):
        return WorkerConfig.from_json(config)
    if isinstance(config, dict):
        data = dict(config)
        data["levels"] = tuple((str(n), int(v)) for n, v in data.get("levels") or ())
        return WorkerConfig(**data)
    raise TypeError(f"expected a WorkerConfig, got {type(config).__name__}")
