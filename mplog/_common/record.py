"""A LogRecord's trip across the process boundary: flatten in the caller, rebuild in the listener.

The standard ``QueueHandler`` pickles the whole ``LogRecord`` in the queue's feeder thread, where
an ``extra`` value that cannot be pickled makes the record vanish without a word (cpython
#84376). Here the calling thread turns the record into a tuple of plain ``str``/``int``/``float``
values before it leaves the logging call: the message is formatted, each extra is rendered to
text, the traceback is formatted. Anything that fails is replaced by a placeholder naming the
failure, and counted. ``marshal`` then encodes the tuple (plain types only, about twice as fast
as pickle, and it cannot run code when decoded).
"""

from __future__ import annotations

import logging
import marshal
import operator
import reprlib
import struct
import traceback
from typing import Any, Dict, NamedTuple, Optional, Tuple

from . import compiled as _compiled

__all__ = ["USER_MESSAGE_KEY", "TAG_COMMON", "TAG_FIELDS", "TAG_TEXT", "COMMON_KEYS", "LEAN_KEYS", "common_fields", "lean_fields", "common_payload", "common_record", "decode", "TEXT_VERSION", "decode_formatted", "encode_formatted", "Formatted", "Record", "deserialize", "exception_summary",
           "flatten", "json_value", "make_record", "safe_text", "text_of", "sanitize", "serialize"]

USER_MESSAGE_KEY = "is_user_message"

# The wire format of a record payload: a marshal'd tuple whose first item is its tag. Both kinds
# are encoded and decoded here, and nowhere else.
TAG_FIELDS = 1  # a Record: the fields, formatted by the listener (custom formats, syslog)
TAG_TEXT = 2  # a Formatted: both texts, formatted by the process that logged it
_VERSION = TAG_FIELDS

# Attributes every LogRecord has; anything else on a record came from ``extra=`` (or a filter).
_STANDARD = frozenset(logging.LogRecord("n", 0, "p", 0, "m", None, None).__dict__) | {
    "message", "asctime", "taskName",
}
_STANDARD_LEN = len(logging.LogRecord("n", 0, "p", 0, "m", None, None).__dict__)
_PRIVATE = frozenset(("_mplog_sent",))  # mplog's own mark on a record, never an extra

_MAX_EXTRA_TEXT = 64 * 1024  # one extra value's text; larger ones are cut, with a marker
_short_repr = reprlib.Repr()
_short_repr.maxstring = 200
_short_repr.maxother = 200


def safe_text(value: Any) -> Tuple[str, int]:
    """Render ``value`` as text for a log line. Never raises; returns (text, failures)."""
    if type(value) is str:
        text = value
    else:
        try:
            text = value if isinstance(value, str) else repr(value)
            if not isinstance(text, str):
                raise TypeError(f"__repr__ returned {type(text).__name__}")
        except BaseException as exc:  # noqa: B036 - a repr may raise anything, even SystemExit
            if isinstance(exc, (KeyboardInterrupt,)):
                raise
            return f"<unprintable {type(value).__name__}: {_describe(exc)}>", 1
    if len(text) > _MAX_EXTRA_TEXT:
        text = text[:_MAX_EXTRA_TEXT] + f"... [{len(text) - _MAX_EXTRA_TEXT} more characters]"
    return text, 0


_JSON_SCALARS = (int, float, bool, type(None))


def json_value(value: Any, depth: int = 0) -> Tuple[Any, int]:
    """``value`` as itself if JSON can hold it (numbers, booleans, None, text, and lists and
    dicts of those, bounded), else as its text (a repr). Never raises; returns (value, failures).
    The jsonl format keeps the types; the text formats print non-text values as their repr."""
    kind = type(value)
    if kind is str:
        return safe_text(value)
    if kind in _JSON_SCALARS:
        if kind is float and (value != value or value in (float("inf"), float("-inf"))):
            return repr(value), 0  # JSON has no NaN or infinity
        return value, 0
    if kind in (list, tuple, dict) and depth < 20:
        try:
            if len(value) <= 1000:
                failures = 0
                if kind is dict:
                    out: Any = {}
                    for k, v in value.items():
                        out[k if type(k) is str else safe_text(k)[0]], bad = json_value(v, depth + 1)
                        failures += bad
                    return out, failures
                items = []
                for v in value:
                    item, bad = json_value(v, depth + 1)
                    items.append(item)
                    failures += bad
                return items, failures
        except Exception:  # a container that changes or misbehaves while we read it
            pass
    return safe_text(value)


def text_of(value: Any) -> str:
    """An extra's value as the text formats print it: text as is, anything else as its repr."""
    return value if type(value) is str else repr(value)


def _describe(exc: BaseException) -> str:
    try:
        detail = str(exc)
    except BaseException:  # noqa: B036
        detail = "<str() failed>"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def exception_summary(exc_info: Any) -> str:
    try:
        lines = traceback.format_exception_only(exc_info[0], exc_info[1])
        return lines[-1].strip() if lines else ""
    except BaseException:  # noqa: B036
        return "<exception could not be described>"


def _message(record: logging.LogRecord) -> Tuple[str, int]:
    try:
        msg = record.getMessage()
        if type(msg) is not str:
            msg = str(msg)
        return msg, 0
    except BaseException as exc:  # noqa: B036
        if isinstance(exc, KeyboardInterrupt):
            raise
        return _formatting_failed(record.msg, record.args, exc), 1


def _formatting_failed(msg: Any, args: Any, exc: BaseException) -> str:
    # Keep what can be kept: the template and a bounded repr of each argument.
    try:
        shown = _short_repr.repr(args)
    except BaseException:  # noqa: B036
        shown = "<args unprintable>"
    return f"{safe_text(msg)[0]} <formatting failed: {_describe(exc)}; args={shown}>"


def flatten(record: logging.LogRecord, context: Optional[Dict[str, Any]] = None,
            message: Optional[str] = None) -> Tuple[Tuple[Any, ...], int]:
    """``record`` as a tuple of plain values (a Record's fields). Returns (fields, placeholders).
    ``message``: the message text as a formatter set on the handler rendered it."""
    failures = 0
    if message is None:
        msg, bad = _message(record)
        failures += bad
    else:
        msg = message
    d = record.__dict__
    extras: Optional[Dict[str, Any]] = None
    if len(d) != _STANDARD_LEN or context:
        extras = {}
        if context:
            for key, value in context.items():
                extras[key], bad = json_value(value)
                failures += bad
        for key in d.keys() - _STANDARD:
            if key == USER_MESSAGE_KEY or key in _PRIVATE:
                continue
            extras[str(key)], bad = json_value(d[key])
            failures += bad
        if not extras:
            extras = None
    exc_text = record.exc_text
    exc_summary = None
    if record.exc_info and record.exc_info[0] is not None:
        exc_summary = exception_summary(record.exc_info)
        if not exc_text:
            try:
                exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            except BaseException as exc:  # noqa: B036
                exc_text = f"<traceback could not be formatted: {_describe(exc)}>"
                failures += 1
    exc_text, stack, bad = _text_fields(exc_text, record.stack_info)
    failures += bad
    if exc_summary is None and exc_text:
        exc_summary = exc_text.rstrip().rsplit("\n", 1)[-1]
    fields = (
        _VERSION,
        record.created, record.levelno, record.levelname, record.name, msg,
        record.pathname, record.lineno, record.funcName, record.processName, record.process,
        record.threadName, exc_text, exc_summary, stack, extras, bool(d.get(USER_MESSAGE_KEY)),
        record.thread or 0, record.relativeCreated,
    )
    return fields, failures


# The common record (no extras, no context, no formatter on the handler): the LogRecord's own
# attributes, taken from its __dict__ in one C call and marshalled as they are, the message's
# template and arguments included. The caller pays for one dict lookup per field and one
# marshal.dumps; the listener does the rest (``%``, formatting). marshal refuses what is not
# plain (an object argument, a str subclass, a traceback in exc_info): then ``serialize``
# flattens the record in the caller as before.
TAG_COMMON = 3
COMMON_KEYS = ("created", "levelno", "levelname", "name", "msg", "args", "pathname", "lineno", "funcName",
               "processName", "process", "threadName", "thread", "relativeCreated", "exc_info", "exc_text",
               "stack_info")
common_fields = operator.itemgetter(*COMMON_KEYS)
# With the default formats (WorkerConfig.lean) the fields they do not print stay behind: 95 ns
# less for the caller and 70 ns less for the listener, of ~500 and ~330.
LEAN_KEYS = ("created", "levelno", "levelname", "name", "msg", "args", "pathname", "lineno", "processName",
             "process", "exc_info", "exc_text", "stack_info")
lean_fields = operator.itemgetter(*LEAN_KEYS)
# Version 2: no back-references (a record has few repeated objects, and building the table of
# them cost more than it saved); loads reads any version.
MARSHAL_VERSION = 2
# marshal.dumps, compiled where the install built mplog._speedups (mplog/_common/compiled.py): the same
# bytes and the same errors (tests/test_records.py), about a third of the time for a record's
# plain fields, because CPython's marshal makes a bytes object and looks up a codec for every
# str it writes.
_compiled_dumps: Any = None if _compiled.speedups is None else _compiled.speedups.dumps


def record_dumps() -> Any:
    """The ``marshal.dumps`` for records made from now on (compiled if ``_compiled.enabled()``)."""
    return _compiled_dumps if _compiled.enabled() else marshal.dumps


_dumps = record_dumps()


def _text_fields(exc_text: Any, stack: Any) -> Tuple[Optional[str], Optional[str], int]:
    """``exc_text`` and ``stack_info`` as text or None. A filter or a caller may set them to
    anything (bytes, a number); the formatters would raise on that, so it becomes its repr and
    a counted placeholder. Returns (exc_text, stack_info, placeholders used)."""
    failures = 0
    if exc_text is not None and type(exc_text) is not str:
        exc_text, failures = safe_text(exc_text)[0], 1
    if stack is not None and type(stack) is not str:
        stack, failures = safe_text(stack)[0], failures + 1
    return exc_text, stack, failures


def common_payload(record: logging.LogRecord, lean: bool = False) -> Optional[bytes]:
    """The payload of a common record, or None when ``serialize`` must do it. The caller checks
    the context (``_worker.context``); SpoolHandler.handle inlines this. Only a LogRecord
    itself: a subclass may render its message otherwise (getMessage), which the listener's
    ``%`` would not."""
    d = record.__dict__
    if len(d) != _STANDARD_LEN or type(record) is not logging.LogRecord:
        return None
    try:
        return _dumps((TAG_COMMON, (lean_fields if lean else common_fields)(d)), MARSHAL_VERSION)
    except (ValueError, KeyError):  # not plain, or a filter took a standard attribute away
        return None


def common_record(fields: Tuple[Any, ...]) -> Tuple[Record, int]:
    """The Record of a common record's fields (either set of keys): its message rendered here,
    as the caller's getMessage() would have. Returns (record, placeholders used)."""
    if len(fields) == len(LEAN_KEYS):
        (created, levelno, levelname, name, msg, args, pathname, lineno, pname, process, exc_info, exc_text,
         stack) = fields
        func, tname, thread, rel = "", "", 0, 0.0
    else:
        (created, levelno, levelname, name, msg, args, pathname, lineno, func, pname, process, tname, thread,
         rel, exc_info, exc_text, stack) = fields
    failures = 0
    try:
        text = msg if type(msg) is str else str(msg)
        if args:
            text = text % args
    except Exception as exc:
        text, failures = _formatting_failed(msg, args, exc), 1
    exc_text, stack, bad = _text_fields(exc_text, stack)
    failures += bad
    summary = exc_text.rstrip().rsplit("\n", 1)[-1] if exc_text else None
    return Record(TAG_FIELDS, created, levelno, levelname, name, text, pathname, lineno, func, pname, process,
                  tname, exc_text, summary, stack, None, False, thread or 0, rel), failures


def sanitize(fields: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Fields of unexpected types (a filter set levelname to an object, say) made plain."""
    fixed = tuple(f if f is None or type(f) in (int, float, bool, dict) else safe_text(f)[0] for f in fields)
    extras = fields[15]
    return fixed[:15] + (None if not isinstance(extras, dict) else
                         {str(k): json_value(v)[0] for k, v in extras.items()},) + fixed[16:]


def serialize(record: logging.LogRecord, context: Optional[Dict[str, Any]] = None,
              message: Optional[str] = None) -> Tuple[bytes, int]:
    """Flatten ``record`` into bytes for the transport. Returns (payload, placeholders used)."""
    fields, failures = flatten(record, context, message)
    try:
        return marshal.dumps(fields), failures
    except ValueError:
        return marshal.dumps(sanitize(fields)), failures + 1


class Record(NamedTuple):
    """What the listener formats: the fields of a LogRecord that crossed the pipe. A tuple, so
    decoding is ``marshal.loads`` plus one ``tuple.__new__``."""

    version: int
    created: float
    levelno: int
    levelname: str
    name: str
    msg: str
    pathname: str = ""
    lineno: int = 0
    funcName: str = ""
    processName: str = ""
    process: int = 0
    threadName: str = ""
    exc_text: Optional[str] = None
    exc_summary: Optional[str] = None
    stack_info: Optional[str] = None
    extras: Optional[Dict[str, Any]] = None
    user: bool = False
    thread: int = 0
    relativeCreated: float = 0.0


_FIELDS_LEN = len(Record._fields)


def make_record(created: float, levelno: int, name: str, msg: str, **fields: Any) -> Record:
    """A record made in the listener itself (a notice or a placeholder)."""
    return Record(_VERSION, created, levelno, logging.getLevelName(levelno), name, msg, **fields)


_make = Record._make


TEXT_VERSION = TAG_TEXT  # the name the rest of mplog used before the tags were explicit


class Formatted(NamedTuple):
    """A record already formatted by the process that logged it (the default formats): the
    listener only appends its texts, as the UTF-8 bytes they travel in. ``warning`` is the first
    line of a WARNING's message, for the stop summary's tally."""

    version: int
    levelno: int
    user: bool
    full: bytes
    simple: Optional[bytes]
    warning: Optional[str]


# A formatted record is not marshal data (whose first byte is a type code, never 2): the tag,
# then levelno(2) flags(1) len(full)(4) len(simple)(4), then the texts' bytes, then a warning's.
_TEXT_HEAD = struct.Struct("<BHBII")
_F_USER, _F_SIMPLE, _F_WARNING = 1, 2, 4


def encode_formatted(levelno: int, user: bool, full: str, simple: Optional[str], warning: Optional[str]) -> bytes:
    """The payload of a record formatted by the process that logged it."""
    full_b = full.encode("utf-8", "backslashreplace")
    flags = _F_USER if user else 0
    if simple is None:
        simple_b = b""
    else:
        simple_b = simple.encode("utf-8", "backslashreplace")
        flags |= _F_SIMPLE
    if warning is None:
        return _TEXT_HEAD.pack(TAG_TEXT, levelno & 0xFFFF, flags, len(full_b), len(simple_b)) + full_b + simple_b
    flags |= _F_WARNING
    return (_TEXT_HEAD.pack(TAG_TEXT, levelno & 0xFFFF, flags, len(full_b), len(simple_b)) + full_b + simple_b
            + warning.encode("utf-8", "backslashreplace"))


def decode_formatted(payload: bytes) -> Formatted:
    """Raises ValueError for a payload that is not a well-formed formatted record."""
    try:
        _tag, levelno, flags, nf, ns = _TEXT_HEAD.unpack_from(payload)
    except struct.error:
        raise ValueError("truncated formatted record") from None
    a = _TEXT_HEAD.size
    b = a + nf
    c = b + ns
    if c > len(payload):
        raise ValueError("truncated formatted record")
    warning = payload[c:].decode("utf-8", "replace") if flags & _F_WARNING else None
    return Formatted(TAG_TEXT, levelno, bool(flags & _F_USER), payload[a:b],
                     payload[b:c] if flags & _F_SIMPLE else None, warning)


def decode(payload: bytes) -> Tuple[Any, int]:
    """Rebuild a Record (or a Formatted) and count the placeholders its decoding used (a
    common record's message that does not format); raises ValueError for a payload that is
    neither."""
    if payload[:1] == b"\x02":
        return decode_formatted(payload), 0
    try:
        fields = marshal.loads(payload)
    except (EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"undecodable record: {exc}") from None
    if type(fields) is tuple and len(fields) == 2 and fields[0] == TAG_COMMON:
        if type(fields[1]) is not tuple or len(fields[1]) not in (len(COMMON_KEYS), len(LEAN_KEYS)):
            raise ValueError("record of an unknown shape")
        return common_record(fields[1])
    if type(fields) is not tuple or len(fields) != _FIELDS_LEN or fields[0] != TAG_FIELDS:
        raise ValueError("record of an unknown shape")
    # Field types are not checked here: the listener formats each record inside its own
    # try/except, so a record with a field of the wrong type becomes a counted placeholder.
    return _make(fields), 0


def deserialize(payload: bytes) -> Any:
    """Rebuild a Record (or a Formatted); raises ValueError for a payload that is neither."""
    return decode(payload)[0]
