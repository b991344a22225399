"""The formatting of one batch: the records taken from the rings in, the two files' bytes and
the console's lines out (``Batch``).

Every record is decoded and formatted here: the process that logged it only marshalled its
fields. The common record in the default formats takes one loop (``Batch.add_payloads``:
compiled where it was built, ``_speedups.format_common``, else its Python twin
``Batch._format_common``); everything else takes the one general path (``Batch.add_payload``),
which decodes, formats, forwards to syslog, tallies warnings, or leaves a counted placeholder.
"""

from __future__ import annotations

import logging
import marshal
import time
from typing import Any, Dict, List, Optional, Tuple

from .._common import compiled as _compiled
from .._common.config import ListenerConfig
from .._common.counters import Counters
from .._common.format import (NOT_TALLIED, SEPARATOR, FullFormatter, JsonFormatter, SimplifiedFormatter, StdlibFormatter, Timestamps, colour,
                      format_both)
from .._common.record import TAG_COMMON, TEXT_VERSION, Formatted, Record, decode, decode_formatted, make_record

__all__ = ["Batch"]

_MAX_DISTINCT_WARNINGS = 1000
_WARNING, _ERROR = logging.WARNING, logging.ERROR
_loads = marshal.loads
_MILLIS = [f"{ms:03d}" for ms in range(1000)]
_MESSAGE = "\n  Message: "
_TAIL = "\n" + SEPARATOR + "\n"
_PIECES = (_MESSAGE, _TAIL, "\n", ": ")  # the constant texts the compiled loop appends
_MAX_HEADS = 4096  # headers kept: call sites times processes; past this the cache starts again
_BLOCK_END = (SEPARATOR + "\n").encode()


def _make_formatters(cfg: ListenerConfig, stamps: Timestamps) -> Tuple[Any, Any]:
    simple: Any = SimplifiedFormatter(stamps)
    full: Any = FullFormatter(stamps)
    if cfg.simplified_format:
        simple = StdlibFormatter(cfg.simplified_format, cfg.datefmt)
    if cfg.full_format == "jsonl":
        full = JsonFormatter()
    elif cfg.full_format:
        full = StdlibFormatter(cfg.full_format, cfg.datefmt)
    return simple, full


class Batch:
    """The texts of one batch: records in, two files' bytes and the console's lines out. Every
    record is decoded and formatted here (the process that logged it only marshalled its
    fields); ``add_payloads`` is the hot loop for common records in the default formats, and
    hands everything else to ``add_payload``, the one general path."""

    def __init__(self, cfg: ListenerConfig, counters: Counters, forwarder: Any) -> None:
        self.counters = counters
        self.stamps = Timestamps()
        self.simple, self.full = _make_formatters(cfg, self.stamps)
        # Both default formats: format them together (shared timestamp and message checks).
        self.fused = type(self.simple) is SimplifiedFormatter and type(self.full) is FullFormatter
        self.simplified_level = cfg.simplified_level
        self.console = cfg.console
        self.console_colour = cfg.console_colour
        self.forwarder = forwarder
        self.warnings: Dict[str, int] = {}
        # Texts, encoded once per batch: one join and one encode beat one encode per record.
        self._full: List[str] = []
        self._simp: List[str] = []
        self._cons: List[str] = []
        self._heads: Dict[Tuple[Any, ...], str] = {}  # see add_payloads
        # _format_common's compiled twin where it was built, and not under MPLOG_PURE_PYTHON=1.
        self._compiled = _compiled.speedups.format_common if _compiled.enabled() else None

    def add_payloads(self, payloads: List[bytes], origin: str) -> None:
        """Add one ring's records. The common record in the default formats is formatted in
        one loop (compiled where it was built, ``_speedups.format_common``; else
        ``_format_common``), with the same result as ``add_payload``; anything else goes there."""
        if not self.fused or self.forwarder is not None or self.console is not None:
            for payload in payloads:
                self.add_payload(payload, origin)
        elif self._compiled is not None:
            self._compiled(payloads, self._full, self._simp, self.simplified_level, self.stamps, self._heads,
                           self._head_rest, self._tally, self.add_payload, origin, _MILLIS, NOT_TALLIED, _PIECES,
                           TAG_COMMON)
        else:
            self._format_common(payloads, origin)

    def _format_common(self, payloads: List[bytes], origin: str) -> None:
        """The reference of the hot loop: what it formats, and what it leaves to the general
        path (any record it does not fully know, as the compiled twin does)."""
        loads = _loads
        full_out = self._full.append
        simp_out = self._simp.append
        simplified_level = self.simplified_level
        stamps = self.stamps
        heads = self._heads
        for payload in payloads:
            try:
                obj = loads(payload)
                if type(obj) is not tuple or len(obj) != 2:
                    raise ValueError
                tag, fields = obj
                if type(tag) is not int or tag != TAG_COMMON or type(fields) is not tuple:
                    raise ValueError
                (created, levelno, levelname, name, msg, args, pathname, lineno, pname, process, _exc_info,
                 exc_text, stack) = fields  # _record.LEAN_KEYS: the default formats
                # Exact types: the header cache below is keyed by equality, and True == 1 == 1.0
                # would share one text ("[stage.py:1]") where the general path writes each.
                if (exc_text is not None or stack is not None or type(msg) is not str or type(created) is not float
                        or type(levelno) is not int or type(levelname) is not str or type(name) is not str
                        or type(lineno) is not int or type(process) is not int or type(pname) is not str
                        or type(pathname) is not str):
                    raise ValueError
                if args:
                    msg = msg % args
                if not msg.isprintable():
                    raise ValueError
                sec = int(created)
                if sec != stamps._sec:
                    stamps.second(created)
                ts = stamps._text
                millis = _MILLIS[int((created % 1) * 1000)]
                # The header but its time, made once per call site and process (and checked
                # once: a header field that would need escaping takes the general path).
                key = (levelname, name, pname, process, pathname, lineno)
                rest = heads.get(key)
                if rest is None:
                    rest = self._head_rest(key)
            except Exception:  # noqa: BLE001 - not the common case, or not well formed: the general path
                self.add_payload(payload, origin)
                continue
            if _WARNING <= levelno < _ERROR and name not in NOT_TALLIED:
                self._tally(msg[:200])
            full_out(f"[{ts}.{millis}] {rest}{_MESSAGE}{msg}{_TAIL}")
            if levelno >= simplified_level:
                simp_out(f"[{ts}] {msg}\n" if levelno < _WARNING else f"[{ts}] {levelname}: {msg}\n")

    def _head_rest(self, key: Tuple[Any, ...]) -> str:
        levelname, name, pname, process, pathname, lineno = key
        filename = pathname[pathname.rfind("/") + 1:] if pathname else "?"
        rest = f"[{levelname}] [{name}] [{pname}:{process}] [{filename}:{lineno}]"
        if not rest.isprintable():
            raise ValueError("a header field needs escaping")
        if len(self._heads) >= _MAX_HEADS:
            self._heads.clear()
        self._heads[key] = rest
        return rest

    def add_payload(self, payload: bytes, origin: str) -> None:
        """The general path: any record, decoded and formatted, or a counted placeholder."""
        if payload[:1] == b"\x02":  # formatted by a process of an earlier mplog (a recovered spool)
            try:
                self.add_text(decode_formatted(payload))
                return
            except ValueError:
                pass  # falls through to the placeholder below
        failures = 0
        try:
            rec, failures = decode(payload)
        except ValueError as exc:
            failures = 1
            rec = make_record(time.time(), logging.WARNING, "mplog", f"<undecodable record from {origin}: {exc}>")
        except Exception as exc:  # noqa: BLE001 - a bug of ours: one record, never the listener
            # The batch is committed only once written, so a record that made the listener fail
            # would fail every listener the supervisor starts after it (a bytes exc_text did).
            failures = 1
            rec = make_record(time.time(), logging.ERROR, "mplog",
                              f"<record from {origin} could not be decoded: {type(exc).__name__}>")
        if failures:
            self.counters.add("replaced_listener", failures)
        if rec[0] == TEXT_VERSION:
            self.add_text(rec)
        else:
            self.add_record(rec)

    def add_text(self, t: Formatted) -> None:
        """A record formatted by the process that logged it: append its texts."""
        full, simple = t.full, t.simple
        if not (full[:1] == b"[" and full.endswith(_BLOCK_END) and (simple is None or simple.endswith(b"\n"))):
            self.counters.add("replaced_listener")  # not what our writers send: a placeholder
            self.add_record(make_record(time.time(), logging.WARNING, "mplog", "<malformed pre-formatted record>"))
            return
        self._append(full.decode("utf-8", "replace"), None if simple is None else simple.decode("utf-8", "replace"),
                     t.levelno)
        if t.warning:
            self._tally(t.warning)

    def add_record(self, rec: Record) -> None:
        try:
            levelno = rec.levelno
            wanted = levelno >= self.simplified_level or rec.user
            if self.fused:
                full, line = format_both(rec, self.stamps, self.full, self.simple, wanted)
            else:
                full = self.full.format(rec)
                line = self.simple.format(rec) if wanted else None
            self._append(full, line, levelno)
            if self.forwarder is not None:
                self.forwarder.submit(rec)
            if logging.WARNING <= levelno < logging.ERROR and rec.name not in NOT_TALLIED:
                self._tally(rec.msg.split("\n", 1)[0][:200])
        except Exception as exc:  # a bad field or a formatter bug costs one record, not the listener
            self.counters.add("replaced_listener")
            self._full.append(self.full.format(make_record(
                time.time(), logging.ERROR, "mplog", f"<record could not be formatted: {exc!r}>")))

    def _append(self, full: str, simple: Optional[str], levelno: int) -> None:
        self._full.append(full)
        if simple is not None:
            self._simp.append(simple)
            if self.console is not None and levelno >= self.console:
                self._cons.append(colour(simple, levelno) if self.console_colour else simple)

    def _tally(self, key: str) -> None:
        if key in self.warnings or len(self.warnings) < _MAX_DISTINCT_WARNINGS:
            self.warnings[key] = self.warnings.get(key, 0) + 1

    def take_texts(self) -> Tuple[bytes, bytes, str]:
        full = "".join(self._full).encode("utf-8", "backslashreplace")
        simp = "".join(self._simp).encode("utf-8", "backslashreplace")
        cons = "".join(self._cons)
        self._full.clear()
        self._simp.clear()
        self._cons.clear()
        return full, simp, cons
