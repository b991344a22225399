"""Formatting: a Record becomes a simplified line or a full block. Runs in the listener only.

Both formats guarantee that a record cannot be mistaken for another: record lines start in
column 0 with ``[``, and everything a message brings (its own newlines, ``\\r``, control and
escape characters, lone surrogates, NUL) is indented or escaped, so no message can forge a
header or rewrite a terminal.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Callable, Dict, Optional, Tuple

from .record import Record, text_of

__all__ = ["clean", "clean_inline", "colour", "Timestamps", "SimplifiedFormatter", "FullFormatter", "SEPARATOR"]

SEPARATOR = "-" * 72
# Loggers whose warnings the stop summary does not tally: mplog's own, and captured stderr
# lines (a traceback printed there would be a dozen "distinct warnings").
NOT_TALLIED = frozenset(("mplog", "stderr"))

# C0 (but tab and newline), DEL, C1, line/paragraph separators, bidi overrides, lone surrogates.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(m: "re.Match[str]") -> str:
    ch = m.group()
    if ch == "\r":
        return "\\r"
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean_inline(text: str) -> str:
    """For a header field: escape newlines too, so the header stays one line."""
    if text.isprintable():
        return text
    return _UNSAFE.sub(_escape, text).replace("\n", "\\n").replace("\t", "\\t")


def clean(text: str, indent: str) -> str:
    """Escape what could fool a reader or a terminal; indent continuation lines."""
    if text.isprintable():  # the common case, checked in C
        return text
    # A trailing newline (py.warnings messages end with one) would only add an empty line.
    text = _UNSAFE.sub(_escape, text.replace("\r\n", "\n").rstrip("\n"))
    return text.replace("\n", "\n" + indent)


class Timestamps:
    """``time.strftime`` costs microseconds; records arrive many per second, so cache the second."""

    def __init__(self) -> None:
        self._sec = -1
        self._text = ""

    def second(self, created: float) -> str:
        sec = int(created)
        if sec != self._sec:
            # The text first: a time localtime() refuses (out of range) must not leave its second
            # cached with the last second's text (or none).
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
            self._sec = sec
        return self._text

    def millis(self, created: float) -> str:
        return f"{self.second(created)}.{int((created % 1) * 1000):03d}"


class SimplifiedFormatter:
    """``[YYYY-mm-dd HH:MM:SS] message``; WARNING and above name their level; an exception adds
    its one-line summary, never the traceback."""

    def __init__(self, stamps: Optional[Timestamps] = None) -> None:
        self.stamps = stamps or Timestamps()

    def format(self, rec: Record) -> str:
        msg = clean(rec.msg, "    ")
        if rec.exc_summary:
            msg = f"{msg} ({clean(rec.exc_summary, '    ')})"
        if rec.levelno >= logging.WARNING:
            return f"[{self.stamps.second(rec.created)}] {clean_inline(rec.levelname)}: {msg}\n"
        return f"[{self.stamps.second(rec.created)}] {msg}\n"


class FullFormatter:
    """One block per record: header, message, context, traceback, separator."""

    def __init__(self, stamps: Optional[Timestamps] = None) -> None:
        self.stamps = stamps or Timestamps()

    def format(self, rec: Record) -> str:
        path = rec.pathname
        filename = path.rsplit("/", 1)[-1] if path else "?"
        head = (f"[{self.stamps.millis(rec.created)}] [{rec.levelname}] [{rec.name}] "
                f"[{rec.processName}:{rec.process}] [{filename}:{rec.lineno}]")
        if not head.isprintable():  # one check in C for the five fields; escape only if needed
            head = (f"[{self.stamps.millis(rec.created)}] [{clean_inline(rec.levelname)}] "
                    f"[{clean_inline(rec.name)}] [{clean_inline(rec.processName)}:{rec.process}] "
                    f"[{clean_inline(filename)}:{rec.lineno}]")
        msg = rec.msg
        if not msg.isprintable():
            msg = clean(msg, "           ")
        if not (rec.extras or rec.exc_text or rec.stack_info):
            return f"{head}\n  Message: {msg}\n{SEPARATOR}\n"
        parts = [f"{head}\n  Message: {msg}\n"]
        if rec.extras:
            parts.append("  Context:\n")
            for key, value in rec.extras.items():
                parts.append(f"    {clean_inline(key)}: {clean(text_of(value), '      ')}\n")
        if rec.exc_text:
            parts.append("  " + clean(rec.exc_text, "  ") + "\n")
        if rec.stack_info:
            parts.append("  " + clean(rec.stack_info, "  ") + "\n")
        parts.append(SEPARATOR + "\n")
        return "".join(parts)


def format_both(rec: Record, stamps: Timestamps, full_fmt: FullFormatter, simple_fmt: SimplifiedFormatter,
                simple: bool) -> Tuple[str, Optional[str]]:
    """The listener's hot path with both default formats: one timestamp lookup and one check of
    the message for both. Same output as FullFormatter and SimplifiedFormatter."""
    if rec.extras or rec.exc_text or rec.stack_info or rec.exc_summary:
        full = full_fmt.format(rec)
        return full, (simple_fmt.format(rec) if simple else None)
    created = rec.created
    sec = int(created)
    if sec != stamps._sec:
        stamps._sec = sec
        stamps._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
    ts = stamps._text
    msg = rec.msg
    path = rec.pathname
    filename = path[path.rfind("/") + 1:] if path else "?"
    head = (f"[{ts}.{int((created % 1) * 1000):03d}] [{rec.levelname}] [{rec.name}] "
            f"[{rec.processName}:{rec.process}] [{filename}:{rec.lineno}]")
    if not head.isprintable():
        head = (f"[{ts}.{int((created % 1) * 1000):03d}] [{clean_inline(rec.levelname)}] "
                f"[{clean_inline(rec.name)}] [{clean_inline(rec.processName)}:{rec.process}] "
                f"[{clean_inline(filename)}:{rec.lineno}]")
    if msg.isprintable():
        full = f"{head}\n  Message: {msg}\n{SEPARATOR}\n"
        if not simple:
            return full, None
        smsg = msg
    else:
        full = f"{head}\n  Message: {clean(msg, '           ')}\n{SEPARATOR}\n"
        if not simple:
            return full, None
        smsg = clean(msg, "    ")
    if rec.levelno >= logging.WARNING:
        return full, f"[{ts}] {clean_inline(rec.levelname)}: {smsg}\n"
    return full, f"[{ts}] {smsg}\n"


class _Fields(dict):  # type: ignore[type-arg]
    """An extra that a record lacks formats as ``-`` instead of failing the record."""

    def __missing__(self, key: str) -> str:
        return "-"


class _LenientFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return self._fmt % _Fields(record.__dict__) if self._fmt else record.getMessage()


class StdlibFormatter:
    """A user's ``logging.Formatter`` format string, applied to a Record in the listener.

    The Record becomes a LogRecord (message already formatted, extras as attributes), so every
    ``%(attr)s`` of the standard library works, ``%(sample)s`` for an extra key too. The result
    is cleaned like our own formats: it cannot forge a line.
    """

    def __init__(self, fmt: str, datefmt: Optional[str] = None, indent: str = "    ") -> None:
        self.formatter = _LenientFormatter(fmt, datefmt)
        self.indent = indent

    def format(self, rec: Record) -> str:
        attrs = {
            "name": rec.name, "msg": rec.msg, "args": None, "levelname": rec.levelname,
            "levelno": rec.levelno, "pathname": rec.pathname,
            "filename": rec.pathname.rsplit("/", 1)[-1] if rec.pathname else "?",
            "module": (rec.pathname.rsplit("/", 1)[-1].rsplit(".", 1)[0]) if rec.pathname else "?",
            "lineno": rec.lineno, "funcName": rec.funcName, "created": rec.created,
            "msecs": (rec.created % 1) * 1000, "process": rec.process, "processName": rec.processName,
            "threadName": rec.threadName, "exc_text": rec.exc_text, "stack_info": rec.stack_info,
            # The logging process's, not the listener's.
            "thread": rec.thread, "relativeCreated": rec.relativeCreated,
        }
        if rec.extras:
            for key, value in rec.extras.items():
                attrs.setdefault(key, text_of(value))
        record = logging.makeLogRecord(attrs)
        text = self.formatter.format(record)
        return clean(text, self.indent) + "\n"


_JSON_FIXED = ("timestamp", "level", "logger", "process", "pid", "thread", "file", "line", "function",
               "message", "exception", "stack")


class JsonFormatter:
    """``full_format="jsonl"``: one JSON object per line, every extra key at the top level
    (prefixed ``extra_`` if it would shadow a fixed key)."""

    def __init__(self) -> None:
        import json
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def format(self, rec: Record) -> str:
        created = rec.created
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(created))
        ts += f".{int((created % 1) * 1000):03d}" + time.strftime("%z", time.localtime(created))
        obj = {
            "timestamp": ts, "level": rec.levelname, "logger": rec.name, "process": rec.processName,
            "pid": rec.process, "thread": rec.threadName,
            "file": rec.pathname, "line": rec.lineno, "function": rec.funcName, "message": rec.msg,
            "exception": rec.exc_text, "stack": rec.stack_info,
        }
        if rec.extras:
            for key, value in rec.extras.items():
                obj["extra_" + key if key in obj else key] = value
        line = self._dumps(obj)
        # JSON leaves these unescaped, but they end lines for some readers (str.splitlines).
        if "\u2028" in line or "\u2029" in line:
            line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        return line + "\n"


FormatFunc = Callable[[Record], str]
_LEVEL_COLOURS: Dict[int, str] = {
    logging.DEBUG: "\x1b[2m", logging.INFO: "", logging.WARNING: "\x1b[33m",
    logging.ERROR: "\x1b[31m", logging.CRITICAL: "\x1b[1;31m",
}


def colour(line: str, levelno: int) -> str:
    """Wrap a (clean) console line in the ANSI colour of its level."""
    code = ""
    for lvl in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG):
        if levelno >= lvl:
            code = _LEVEL_COLOURS[lvl]
            break
    if not code:
        return line
    return f"{code}{line.rstrip(chr(10))}\x1b[0m\n"
