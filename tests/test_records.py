"""Hostile and broken input: every record still arrives as one intact record, counted where a
placeholder stood in, and the caller never raises."""

from __future__ import annotations

import logging
import pytest
import threading
from concurrent.futures import ProcessPoolExecutor


from conftest import app_blocks, read_blocks, simplified_lines


class Unpicklable:
    def __init__(self):
        self.lock = threading.Lock()

    def __repr__(self):
        return "<Unpicklable with a lock>"


class BadRepr:
    def __repr__(self):
        raise RuntimeError("repr exploded")

    __str__ = __repr__


class RecursiveRepr:
    def __repr__(self):
        return repr(self)


class UnpicklableError(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()

    def __reduce__(self):
        raise TypeError("cannot pickle this exception")


def _log_everything(_: object = None) -> None:
    log = logging.getLogger("hostile")
    log.info("unpicklable arg %s", Unpicklable())
    log.info("unpicklable extra", extra={"handle": Unpicklable()})
    log.info("bad repr arg %r", BadRepr())
    log.info("bad repr extra", extra={"bad": BadRepr()})
    log.info("recursive repr extra", extra={"rec": RecursiveRepr()})
    log.info("wrong arg count %d %d", 1)
    log.info("surrogate \udc80 and NUL \x00 end")
    log.info("line one\n[2026-01-01 00:00:00.000] [CRITICAL] [forged] [x:1] [y.py:1]\n" + "-" * 72)
    log.info("carriage\rreturn and \x1b[31mANSI\x1b[0m and bell\x07")
    log.info("big %s", "x" * (5 * 1024 * 1024))
    try:
        raise UnpicklableError("cannot travel")
    except UnpicklableError:
        log.exception("unpicklable exception")
    log.info("last")


EXPECTED = [
    "unpicklable arg <Unpicklable with a lock>",
    "unpicklable extra",
    None,  # bad repr arg: placeholder, checked below
    "bad repr extra",
    "recursive repr extra",
    None,  # wrong arg count
    "surrogate \\udc80 and NUL \\x00 end",
    None,  # forged header
    "carriage\\rreturn and \\x1b[31mANSI\\x1b[0m and bell\\x07",
    None,  # 5 MB
    "unpicklable exception",
    "last",
]


def _check(svc):
    assert svc.flush(60)
    blocks = app_blocks(svc.full_path)
    assert len(blocks) == len(EXPECTED)
    for b, want in zip(blocks, EXPECTED):
        if want is not None:
            assert b["message"] == want
    assert blocks[1]["context"] == {"handle": "<Unpicklable with a lock>"}
    assert blocks[2]["message"].startswith("bad repr arg %r <formatting failed: RuntimeError: repr exploded; args=(<BadRepr")
    assert blocks[3]["context"]["bad"] == "<unprintable BadRepr: RuntimeError: repr exploded>"
    assert blocks[4]["context"]["rec"].startswith("<unprintable RecursiveRepr: RecursionError")
    assert "formatting failed: TypeError" in blocks[5]["message"]
    # The forged header is a continuation of one message, not a record of its own.
    assert blocks[7]["message"].startswith("line one\n[2026-01-01 00:00:00.000] [CRITICAL] [forged]")
    assert not any(b["logger"] == "forged" for b in read_blocks(svc.full_path))
    assert blocks[9]["message"] == "big " + "x" * (5 * 1024 * 1024)
    assert "UnpicklableError: cannot travel" in "\n".join(blocks[10]["lines"])
    h = svc.health()
    # Placeholders: bad repr arg, bad repr extra, recursive repr, wrong arg count.
    assert h["records"]["replaced"] == 4
    assert h["records"]["written"] == len(EXPECTED)
    simple = simplified_lines(svc.simplified_path)
    assert sum(1 for ln in simple if "CRITICAL" in ln) == 0
    assert any(ln.endswith("ERROR: unpicklable exception (test_records.UnpicklableError: cannot travel)") for ln in simple)
    raw = svc.simplified_path.read_bytes()
    assert b"\x1b" not in raw and b"\r" not in raw and b"\x00" not in raw and b"\x07" not in raw


def test_hostile_records_from_main_process(service):
    svc = service()
    _log_everything()
    _check(svc)


def test_hostile_records_from_workers(service, ctx):
    svc = service()
    with ProcessPoolExecutor(1, mp_context=ctx, **svc.pool_kwargs()) as pool:
        pool.submit(_log_everything).result(120)
    _check(svc)


class _Weird:
    def __repr__(self):
        return "WEIRD"

    def __format__(self, spec):
        raise ValueError("no format for you")


def test_fields_of_unexpected_types_still_give_a_record(service):
    """A filter that puts an object where logging has a string: the record is still written,
    with the value's repr, and the replacement is counted."""
    svc = service()
    lg = logging.getLogger("weird")

    def spoil(record):
        record.levelname = _Weird()
        return True

    lg.addFilter(spoil)
    try:
        lg.warning("odd level name")
    finally:
        lg.removeFilter(spoil)
    assert svc.flush(10)
    blocks = app_blocks(svc.full_path)
    assert [(b["message"], b["level"]) for b in blocks] == [("odd level name", "WEIRD")]
    assert svc.health()["records"]["replaced"] == 1


@pytest.mark.parametrize("levelno", [5, 10, 20, 30, 40, 50])
@pytest.mark.parametrize("msg, args", [("processed item %d of %s", (7, "stage")), ("plain", None),
                                       ("accents %s", ("é ü 漢",)), ("%(k)s by name", ({"k": "v"},))])
def test_fast_path_formats_exactly_like_the_full_path(levelno, msg, args):
    """The caller's fast path (a common record formatted straight from the LogRecord) gives the
    very bytes of the full path (flatten, then format)."""
    from mplog._format import Preformatter
    from mplog._record import _make, flatten
    pre = Preformatter(logging.INFO)
    record = logging.LogRecord("t.fast", levelno, "/srv/app/stage.py", 42, msg, args, None, "work")
    fast = pre.fast_payload(record)
    assert fast is not None and fast == pre.payload(_make(flatten(record, None)[0]))


@pytest.mark.parametrize("msg, args", [("two\nlines", None), ("escape \x1b[2J", None), ("bad %d", ("x",)),
                                       (12345, None)])
def test_fast_path_leaves_the_unusual_to_the_full_path(msg, args):
    from mplog._format import Preformatter
    record = logging.LogRecord("t.fast", logging.INFO, "/srv/app/stage.py", 1, msg, args, None)
    assert Preformatter(logging.INFO).fast_payload(record) is None
