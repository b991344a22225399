"""Configuration: the service's options, validated once, and the worker's picklable share.

``ServiceConfig`` is built by ``LogService`` from its keyword options and raises ``ValueError``
naming the option for any bad value, so mistakes surface where they are made, not in a child
process. ``WorkerConfig`` is the part a worker needs; it holds only paths and plain values, so it
pickles under fork, spawn and forkserver, and survives ``json`` too (a scheduler can pass it in an
environment variable).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from .worker_config import WorkerConfig

__all__ = ["OVERFLOW_POLICIES", "ListenerConfig", "ServiceConfig", "WorkerConfig", "parse_level"]

OVERFLOW_POLICIES = ("block", "drop", "timeout", "stderr")

LevelLike = Union[int, str]


def parse_level(option: str, value: object) -> int:
    """Return ``value`` as a logging level number, or raise ``ValueError`` naming ``option``."""
    if isinstance(value, bool):  # bool is an int; True is not a level anyone means
        raise ValueError(f"{option}: expected a level name or number, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{option}: level must be >= 0, got {value!r}")
        return value
    if isinstance(value, str):
        number = logging.getLevelName(value.strip().upper())
        if isinstance(number, int):
            return number
        raise ValueError(f"{option}: unknown level name {value!r}")
    raise ValueError(f"{option}: expected a level name or number, got {value!r}")


def _positive(option: str, value: object, *, integer: bool = False, allow_zero: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{option}: expected {kind}, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):  # NaN, inf
        raise ValueError(f"{option}: expected a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{option}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


# Both are NamedTuples, as WorkerConfig is, not dataclasses: the main process imports this
# module, and a forked worker maps whatever its parent had (dataclasses with its inspect, ast and
# dis, and the code it generates for these two classes, were 1.4 MB of every forked worker's RSS).
class ListenerConfig(NamedTuple):
    """What the listener process is started with: one typed home for its options, passed as
    JSON on its command line. Built from a ``ServiceConfig`` by ``LogService``; the fields
    after ``runtime_dir`` change with each start of a listener (``_replace``)."""

    fifo_path: str
    counters_path: str
    runtime_dir: str
    simplified_path: str
    full_path: str
    level: int = logging.DEBUG
    simplified_level: int = logging.INFO
    flush_count: int = 1000
    flush_interval: float = 1.0
    shutdown_timeout: float = 5.0
    console: Optional[int] = None
    console_colour: bool = False
    simplified_format: Optional[str] = None
    full_format: Optional[str] = None
    datefmt: Optional[str] = None
    file_mode: Optional[int] = None
    rotate_bytes: Optional[int] = None
    rotate_interval: Optional[float] = None
    backup_count: int = 5
    compress: bool = False
    syslog: Optional[Tuple[str, int]] = None
    syslog_level: int = logging.DEBUG
    recover: Tuple[str, ...] = ()  # spools of earlier runs of this file set, to write first
    follow_symlinks: bool = False  # only in a directory no one else can write (see _service)
    capture_dir: Optional[str] = None  # the main process's capture directory (_capture.py)
    # per start
    reply_fd: int = -1
    lifeline_fd: int = -1
    console_fd: int = 2
    parent_pid: int = 0
    restart_reason: Optional[str] = None
    # earlier restarts whose listener died before it wrote their notice: this one writes them
    late_restarts: Tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(self._asdict())

    @classmethod
    def from_json(cls, text: str) -> "ListenerConfig":
        data = json.loads(text)
        if data.get("syslog"):
            data["syslog"] = tuple(data["syslog"])
        data["recover"] = tuple(data.get("recover") or ())
        data["late_restarts"] = tuple(data.get("late_restarts") or ())
        return cls(**data)


class ServiceConfig(NamedTuple):
    """Every option of a ``LogService``, validated when built."""

    directory: Path
    name: str = "run"
    level: int = logging.DEBUG
    simplified_level: int = logging.INFO
    queue_size: int = 10000
    overflow: str = "block"
    overflow_timeout: float = 0.01
    flush_interval: float = 1.0
    flush_count: int = 1000
    shutdown_timeout: float = 5.0
    capture_warnings: bool = True
    console: Optional[int] = None
    restart_backoff_initial: float = 0.1
    restart_backoff_max: float = 5.0
    degraded_restarts: int = 5
    degraded_window: float = 60.0
    health_interval: float = 1.0
    simplified_format: Optional[str] = None
    full_format: Optional[str] = None
    datefmt: Optional[str] = None
    file_mode: Optional[int] = None
    rotate_bytes: Optional[int] = None
    rotate_interval: Optional[float] = None
    backup_count: int = 5
    compress: bool = False
    syslog: Optional[Tuple[str, int]] = None
    syslog_level: int = logging.DEBUG
    exit_timeout: float = 60.0
    capture_children: bool = True
    capture_output: bool = False

    @property
    def simplified_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def full_path(self) -> Path:
        return self.directory / f"{self.name}.debug.log"

    @property
    def health_path(self) -> Path:
        return self.directory / f"{self.name}.health.json"

    @classmethod
    def build(cls, directory: Union[str, "os.PathLike[str]"], name: str = "run", **options: Any) -> "ServiceConfig":
        """Validate user options; raise ``ValueError`` naming the first bad one."""
        known = set(cls._fields) - {"directory", "name"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(unknown)}")
        try:
            text = os.fspath(directory)
        except TypeError:
            raise ValueError(f"directory: expected a path, got {directory!r}") from None
        if not text or (isinstance(text, str) and not text.strip()) or "\0" in str(text):
            raise ValueError(f"directory: expected a path, got {directory!r} (use '.' for the current directory)")
        path = Path(text)
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
            raise ValueError(f"name: expected a plain file name stem, got {name!r}")

        values: Dict[str, Any] = {}
        for key in ("level", "simplified_level"):
            if key in options:
                values[key] = parse_level(key, options[key])
        if options.get("console") is not None:
            values["console"] = parse_level("console", options["console"])
        if "queue_size" in options:
            values["queue_size"] = _positive("queue_size", options["queue_size"], integer=True)
        if "flush_count" in options:
            values["flush_count"] = _positive("flush_count", options["flush_count"], integer=True)
        if "degraded_restarts" in options:
            values["degraded_restarts"] = _positive("degraded_restarts", options["degraded_restarts"], integer=True)
        for key in ("flush_interval", "shutdown_timeout", "restart_backoff_initial", "restart_backoff_max",
                    "degraded_window", "health_interval", "exit_timeout"):
            if key in options:
                values[key] = float(_positive(key, options[key]))
        if "overflow_timeout" in options:
            values["overflow_timeout"] = float(_positive("overflow_timeout", options["overflow_timeout"], allow_zero=True))
        if "overflow" in options:
            if options["overflow"] not in OVERFLOW_POLICIES:
                raise ValueError(f"overflow: expected one of {', '.join(OVERFLOW_POLICIES)}, got {options['overflow']!r}")
            values["overflow"] = options["overflow"]
        for key in ("simplified_format", "full_format", "datefmt"):
            value = options.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key}: expected a format string, got {value!r}")
            if key != "datefmt" and not (key == "full_format" and value == "jsonl"):
                try:
                    logging.Formatter(value)  # validates the %-style syntax
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{key}: not a usable logging format string: {value!r} ({exc})") from None
            values[key] = value
        if options.get("file_mode") is not None:
            mode = options["file_mode"]
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
                raise ValueError(f"file_mode: expected permission bits like 0o640, got {mode!r}")
            values["file_mode"] = mode
        if options.get("rotate_bytes") is not None:
            values["rotate_bytes"] = _positive("rotate_bytes", options["rotate_bytes"], integer=True)
        if options.get("rotate_interval") is not None:
            interval = options["rotate_interval"]
            named = {"hourly": 3600.0, "daily": 86400.0}
            if isinstance(interval, str):
                if interval not in named:
                    raise ValueError(f"rotate_interval: expected seconds, 'hourly' or 'daily', got {interval!r}")
                interval = named[interval]
            values["rotate_interval"] = float(_positive("rotate_interval", interval))
        if "backup_count" in options:
            values["backup_count"] = _positive("backup_count", options["backup_count"], integer=True, allow_zero=True)
        if "compress" in options:
            if not isinstance(options["compress"], bool):
                raise ValueError(f"compress: expected True or False, got {options['compress']!r}")
            values["compress"] = options["compress"]
        if options.get("syslog") is not None:
            target = options["syslog"]
            if isinstance(target, str):
                host, _, port_text = target.rpartition(":")
                try:
                    target = (host, int(port_text))
                except ValueError:
                    raise ValueError(f"syslog: expected 'host:port' or (host, port), got {options['syslog']!r}") from None
            if (not isinstance(target, (tuple, list)) or len(target) != 2 or not isinstance(target[0], str)
                    or not target[0] or isinstance(target[1], bool) or not isinstance(target[1], int)
                    or not 0 < target[1] < 65536):
                raise ValueError(f"syslog: expected 'host:port' or (host, port), got {options['syslog']!r}")
            values["syslog"] = (target[0], target[1])
        if "syslog_level" in options:
            values["syslog_level"] = parse_level("syslog_level", options["syslog_level"])
        defaults: Dict[str, Any] = cls._field_defaults
        initial = values.get("restart_backoff_initial", defaults["restart_backoff_initial"])
        maximum = values.get("restart_backoff_max", defaults["restart_backoff_max"])
        if initial > maximum:
            raise ValueError(f"restart_backoff_initial ({initial!r}) must not exceed restart_backoff_max ({maximum!r})")
        for key in ("capture_warnings", "capture_children", "capture_output"):
            if key in options:
                if not isinstance(options[key], bool):
                    raise ValueError(f"{key}: expected True or False, got {options[key]!r}")
                values[key] = options[key]
        return cls(directory=path, name=name, **values)
