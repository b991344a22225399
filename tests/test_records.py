"""Hostile and broken input: every record still arrives as one intact record, counted where a
placeholder stood in, and the caller never raises."""

from __future__ import annotations

import logging
import pytest
import threading
import time
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


_COMMON_CASES = [("processed item %d of %s", (7, "stage")), ("plain", None), ("accents %s", ("é ü 漢",)),
                 ("%(k)s by name", ({"k": "v"},)), ("a list %s, a float %.3f", ([1, "two", None], 2.5)),
                 (12345, None), ("bad %d", ("x",)), ("too few %s %s", (1,)), ("two\nlines", None),
                 ("escape \x1b[2J", None), ("surrogate \udc80", None), ("", None)]


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("levelno", [5, 10, 20, 30, 40, 50])
@pytest.mark.parametrize("msg, args", _COMMON_CASES)
def test_a_common_record_arrives_as_the_flattened_record(levelno, msg, args, lean):
    """The caller's hot path ships the LogRecord's own fields, template and arguments
    included; the listener renders the message. The result is the Record that flattening in
    the caller gives, placeholder (and its count) included; lean (the default formats) leaves
    out only what those formats never print."""
    from mplog._common.record import _make, common_payload, decode, flatten
    record = logging.LogRecord("t.fast", levelno, "/srv/app/stage.py", 42, msg, args, None, "work")
    payload = common_payload(record, lean)
    assert payload is not None
    fields, failures = flatten(record, None)
    want = _make(fields)
    if lean:
        want = want._replace(funcName="", threadName="", thread=0, relativeCreated=0.0)
    assert decode(payload) == (want, failures)


class _Plain(str):
    pass


def _with_traceback():
    try:
        raise KeyError("k")
    except KeyError:
        import sys
        return sys.exc_info()


@pytest.mark.parametrize("case", ["extra", "object arg", "str subclass", "traceback", "exception arg"])
def test_the_caller_leaves_the_unusual_to_flattening(case):
    """What marshal cannot carry as it is (objects, subclasses, tracebacks) or what the common
    shape has no place for (extras) is flattened in the caller, as before."""
    from mplog._common.record import common_payload
    msg, args, exc = "m %s", ("x",), None
    if case == "object arg":
        args = (object(),)
    elif case == "str subclass":
        msg = _Plain("m %s")
    elif case == "traceback":
        exc = _with_traceback()
    elif case == "exception arg":
        args = (ValueError("v"),)
    record = logging.LogRecord("t.fast", logging.INFO, "/srv/app/stage.py", 1, msg, args, exc)
    if case == "extra":
        record.request_id = 7
    assert common_payload(record) is None


def _batch(level=logging.INFO, loop="python"):
    import types
    from mplog._listener.batch import Batch

    class Counts:
        def __init__(self):
            self.added = 0

        def add(self, name, n=1):
            self.added += n

    cfg = types.SimpleNamespace(simplified_level=level, console=None, console_colour=False, simplified_format=None,
                                full_format=None, datefmt=None)
    batch = Batch(cfg, Counts(), None)
    if loop == "python":
        batch._compiled = None  # the reference loop, which an install without a compiler runs
    elif batch._compiled is None:
        pytest.skip("mplog._speedups is not built here (tests/test_spool.py::test_the_compiled_ring_loops_are_built "
                    "says why)")
    return batch


@pytest.mark.parametrize("loop", ["python", "compiled"])
@pytest.mark.parametrize("simplified_level", [logging.INFO, logging.ERROR])
def test_the_listeners_hot_loop_writes_what_the_general_path_writes(simplified_level, loop):
    """Batch.add_payloads formats common records in one loop (compiled, or its Python twin) and
    hands the rest to the general path (add_payload): they give the very same bytes, warnings
    tally and placeholders."""
    from mplog._common.record import common_payload, serialize
    payloads = []
    for levelno in (10, 20, 30, 40):
        for msg, args in _COMMON_CASES:
            record = logging.LogRecord("t.fast", levelno, "/srv/app/stage.py", 42, msg, args, None, "work")
            payloads.append(common_payload(record, lean=True))
    odd = logging.LogRecord("odd\x1bname", 20, "/srv/app/stage.py", 1, "odd logger", None, None)
    payloads.append(common_payload(odd, lean=True))
    payloads.append(common_payload(record, lean=False))  # all the keys: the general path
    extra = logging.LogRecord("t.fast", 30, "/srv/app/stage.py", 2, "with extra", None, None)
    extra.k = "v"
    payloads.append(serialize(extra)[0])
    assert all(payloads)
    hot, general = _batch(simplified_level, loop), _batch(simplified_level)
    hot.add_payloads(payloads, "test")
    for payload in payloads:
        general.add_payload(payload, "test")
    texts = hot.take_texts()
    assert texts == general.take_texts()
    assert texts[0].count(b"\n[") + 1 == len(payloads)  # one block per record
    assert hot.warnings == general.warnings and hot.warnings
    assert hot.counters.added == general.counters.added == 2 * 4  # two that do not format, at 4 levels
    # Something that is no record at all: a placeholder (stamped with the time it was found).
    hot.add_payloads([b"\x00 not a record"], "test")
    assert b"<undecodable record from test" in hot.take_texts()[0] and hot.counters.added == 2 * 4 + 1


def test_a_handler_subclass_with_its_own_emit_gets_every_record(tmp_path):
    """The hot path skips emit(): a subclass that overrides emit() still gets every record."""
    import mplog
    seen = []

    class Tapped(mplog.SpoolHandler):
        def emit(self, record):
            seen.append(record.getMessage())
            super().emit(record)

    with mplog.LogService(tmp_path / "tap") as svc:
        handler = Tapped(svc.worker_config)
        lg = logging.getLogger("t.tapped")
        lg.addHandler(handler)
        lg.propagate = False
        try:
            lg.info("one %d", 1)
        finally:
            lg.removeHandler(handler)
        assert svc.flush(10)
    assert seen == ["one 1"]
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["one 1"]


def test_arguments_are_rendered_as_they_were_at_the_call(service):
    """The listener renders the message from the arguments as marshal copied them in the
    logging call: changing a list afterwards does not change the line."""
    svc = service()
    items = ["a"]
    logging.getLogger("t.args").info("items %s", items)
    items.append("changed later")
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["items ['a']"]


class _BraceRecord(logging.LogRecord):
    """The logging cookbook's way to {}-style messages: a LogRecord whose getMessage differs."""

    def getMessage(self):
        return str(self.msg).format(*self.args)


def test_a_record_class_with_its_own_getmessage_is_rendered_by_it(service):
    """The hot path ships template and arguments for the listener to render with ``%``: a
    LogRecord subclass (setLogRecordFactory) that renders otherwise must be rendered by its own
    getMessage, in the caller."""
    svc = service()
    old = logging.getLogRecordFactory()
    logging.setLogRecordFactory(_BraceRecord)
    try:
        logging.getLogger("t.brace").info("{} of {}", 3, "four")
    finally:
        logging.setLogRecordFactory(old)
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["3 of four"]


# --- the compiled marshal (mplog._speedups.dumps) ----------------------------------------------

import marshal  # noqa: E402
import re  # noqa: E402
import math  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from mplog._common import record as _record# noqa: E402

_compiled_dumps = _record._compiled_dumps
needs_compiled = pytest.mark.skipif(_compiled_dumps is None, reason="mplog._speedups is not built here "
                                    "(tests/test_spool.py::test_the_compiled_ring_loops_are_built says why)")

# What a record's fields hold, and the values at the edges of each case the C code writes itself
# (int32, a str's UTF-8, a lone surrogate, the depth limit) or hands to CPython's marshal.
EDGES = [None, True, False, 0, 1, -1, 2 ** 31 - 1, -2 ** 31, 2 ** 31, -2 ** 31 - 1, 2 ** 63, -10 ** 30, 0.0, -0.0,
         1.5, math.inf, -math.inf, math.nan, 1e-310, "", "abc", "héllo", "日本語", "\U0001F600", "a\udc80b",
         b"", b"\x00xyz", (), (1,), ((1, 2), ("a",)), "x" * 5000, ("y" * 3000,) * 3, [1, "2"], {"a": 1.0}, 1j,
         frozenset({1}), (1, [2]), (((((((((((((((((((1,))))))))))))))))))), ("ok", 2 ** 40)]

_leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text() | st.binary()
           | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
_values = st.recursive(_leaves, lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=3)
                       | st.tuples(inner, inner, inner, inner), max_leaves=30)


@needs_compiled
@pytest.mark.parametrize("value", EDGES, ids=lambda v: type(v).__name__)
def test_the_compiled_marshal_writes_marshals_bytes(value):
    for version in range(marshal.version + 1):
        assert _compiled_dumps(value, version) == marshal.dumps(value, version), version


@needs_compiled
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values)
def test_the_compiled_marshal_writes_marshals_bytes_for_any_plain_value(value):
    assert _compiled_dumps(value, 2) == marshal.dumps(value, 2)


@needs_compiled
def test_the_compiled_marshal_refuses_what_marshal_refuses():
    class S(str):
        pass

    for value in (S("x"), ("ok", S("x")), object(), (1, (2, object())), logging.getLogger()):
        with pytest.raises(ValueError) as ours:
            _compiled_dumps(value, 2)
        with pytest.raises(ValueError) as theirs:
            marshal.dumps(value, 2)
        assert str(ours.value) == str(theirs.value)


@needs_compiled
def test_a_real_records_fields_marshal_the_same(monkeypatch):
    made = []
    for args in [(), (1, 2.5, "x"), ("日本", -(2 ** 70)), ({"k": 1},)]:
        rec = logging.LogRecord("app.sub", logging.WARNING, "/srv/app/ü.py", 12, "m %s" * len(args), args, None)
        made.append((_record.TAG_COMMON, _record.common_fields(rec.__dict__)))
        made.append((_record.TAG_COMMON, _record.lean_fields(rec.__dict__)))
    for fields in made:
        assert _compiled_dumps(fields, _record.MARSHAL_VERSION) == marshal.dumps(fields, _record.MARSHAL_VERSION)
    # Which one a handler made now uses: MPLOG_PURE_PYTHON=1 keeps marshal's own.
    monkeypatch.delenv("MPLOG_PURE_PYTHON", raising=False)
    assert _record.record_dumps() is _compiled_dumps
    monkeypatch.setenv("MPLOG_PURE_PYTHON", "1")
    assert _record.record_dumps() is marshal.dumps


# --- the listener's hot loop, compiled (mplog._speedups.format_common) and in Python ----------

def _lean_payload(fields):
    return marshal.dumps((_record.TAG_COMMON, tuple(fields)), _record.MARSHAL_VERSION)


def _run_loop(loop, payloads, level):
    """The texts, tallies and placeholders of one loop over payloads, and which payloads it left
    to the general path."""
    batch = _batch(level, loop)
    general = []
    add_payload = batch.add_payload

    def counted(payload, origin):
        general.append(payload)
        add_payload(payload, origin)

    batch.add_payload = counted
    batch.add_payloads(payloads, "test")
    full, simp, _ = batch.take_texts()
    # A placeholder is stamped with the time it was made: the same in both runs but for that.
    return (_PLACED.sub(b"[placed]", full), _PLACED.sub(b"[placed]", simp)), batch.warnings, batch.counters.added, general


_PLACED = re.compile(rb"\[[0-9: .-]{19,23}\](?= \[(WARNING|ERROR)\] \[mplog\] \[:0\]| (WARNING|ERROR): <)")


def _general_path(payloads, level):
    """The texts, tallies and placeholders the general path (add_payload) gives payloads, as
    _run_loop gives them."""
    general = _batch(level)
    for payload in payloads:
        general.add_payload(payload, "test")
    full, simp, _ = general.take_texts()
    return (_PLACED.sub(b"[placed]", full), _PLACED.sub(b"[placed]", simp)), general.warnings, general.counters.added


_odd = st.sampled_from([None, 0, -1, 1.5, True, "x", "", "WARNING", "a\x1bb", "ü", b"b", (), (1,), [1], {"k": 1}])
_created = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1.7e9, 1.7e9 + 0.9999999, -0.5, 0.0, -1e-300,
                                                                              1e19, 1700000000])
_msgs = st.text(max_size=30) | st.sampled_from(["item %d of %s", "%(k)s", "%s", "%%", "%.3f", "bad %d", "a\nb", "é %s"])
_args = st.none() | st.tuples() | st.tuples(_leaves) | st.tuples(_leaves, _leaves) | st.just(({"k": "v"},)) | _odd


@st.composite
def _lean_fields(draw):
    """The 13 lean fields (_record.LEAN_KEYS), mostly well formed, each sometimes not."""
    def sometimes(good):
        return draw(st.one_of(good, _odd) if draw(st.integers(0, 5)) == 0 else good)
    return [sometimes(_created), sometimes(st.sampled_from([5, 10, 20, 30, 35, 40, 50])),
            sometimes(st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR", "Level 35"])),
            sometimes(st.sampled_from(["app", "app.sub", "mplog", "stderr", "näme"])), sometimes(_msgs),
            sometimes(_args), sometimes(st.sampled_from(["/srv/app/stage.py", "", "noslash.py", "/a/b\x07.py"])),
            sometimes(st.integers(0, 10 ** 6)), sometimes(st.sampled_from(["MainProcess", "Fork-1", "w\tx"])),
            sometimes(st.integers(1, 2 ** 22)), None, sometimes(st.none()), sometimes(st.none())]


_payloads = st.lists(_lean_fields().map(_lean_payload) | st.sampled_from(
    [b"", b"\x00 not a record", marshal.dumps((_record.TAG_COMMON, (1, 2))), marshal.dumps([3, ()]),
     marshal.dumps((4, ())), marshal.dumps("text")]), min_size=1, max_size=12)


@needs_compiled
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_payloads, st.sampled_from([logging.DEBUG, logging.INFO, logging.ERROR]))
def test_the_compiled_hot_loop_is_its_python_twin(payloads, level):
    """Whatever the fields hold, the compiled loop writes the bytes, tallies and placeholders of
    the Python loop, and leaves the very same records to the general path."""
    assert _run_loop("compiled", payloads, level) == _run_loop("python", payloads, level)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_payloads, st.sampled_from([logging.DEBUG, logging.INFO, logging.ERROR]))
def test_the_hot_loop_writes_what_the_general_path_writes_whatever_the_fields(payloads, level):
    texts, warnings, added, _ = _run_loop("python", payloads, level)
    assert (texts, warnings, added) == _general_path(payloads, level)


@pytest.mark.parametrize("loop", ["python", "compiled"])
def test_the_hot_loop_formats_the_common_record_itself(loop):
    """The loops must do the work, not hand it all on: a common record never reaches the
    general path (which gives the same bytes, more slowly, so only this test would notice)."""
    payloads = []
    for i, (levelno, name) in enumerate([(10, "app"), (20, "app.sub"), (30, "app"), (30, "mplog"), (40, "app")]):
        record = logging.LogRecord(name, levelno, "/srv/app/stage.py", 40 + i, "item %d of %s", (i, "é"), None)
        record.created += i * 0.37  # another millisecond, and another second
        payloads.append(_record.common_payload(record, lean=True))
    texts, warnings, _, general = _run_loop(loop, payloads, logging.INFO)
    assert general == []
    assert texts[0].count(SEPARATOR_BYTES) == 5 and texts[1].count(b"\n") == 4
    assert warnings == {"item 2 of \u00e9": 1}


SEPARATOR_BYTES = b"-" * 72


@pytest.mark.parametrize("value, shown", [(b"Traceback: boom", "b'Traceback: boom'"), (7, "7")])
@pytest.mark.parametrize("path", ["common", "flatten"])
def test_an_exc_text_or_stack_info_that_is_not_text_is_a_counted_placeholder(path, value, shown):
    """A filter may set exc_text or stack_info to anything. The formatters would raise on bytes
    or a number (hypothesis found the listener's general path did), so each becomes its repr and
    one counted placeholder, on the caller's side and on the listener's."""
    record = logging.LogRecord("app", logging.ERROR, "/srv/app/stage.py", 3, "failed", None, None)
    record.exc_text = value
    record.stack_info = value
    if path == "common":
        rec, failures = _record.decode(_record.common_payload(record, lean=True))
    else:
        fields, failures = _record.flatten(record)
        rec = _record.Record(*fields)
    assert (rec.exc_text, rec.stack_info, failures) == (shown, shown, 2)
    assert rec.exc_summary == shown
    batch = _batch()
    batch.add_record(rec)
    full = batch.take_texts()[0]
    assert shown.encode() in full and b"could not be formatted" not in full


def test_a_record_no_formatter_takes_does_not_stop_the_listener(service, ctx):
    """A worker's filter sets exc_text to bytes and stack_info to a number. Before the fix the
    listener's general path raised on that record, the listener died, and each new listener died
    on the same uncommitted batch: six restarts in ten seconds and nothing written after it. Now
    the record is written with a counted placeholder, and so is the next."""
    import workers
    svc = service()
    p = ctx.Process(target=workers.log_not_text, args=(svc.worker_config, "w"))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert svc.flush(30)
    health = svc.health()
    assert health["restarts"] == 0 and health["records"]["replaced"] >= 2, health
    blocks = {b["message"]: b for b in app_blocks(svc.full_path)}
    assert set(blocks) == {"w poisoned", "w after"}
    assert "b'Traceback: boom'" in svc.full_path.read_text()


def test_a_time_out_of_range_is_never_stamped_with_the_last_seconds_text():
    """Timestamps caches one second's text. A created localtime() refuses must raise each time
    (the formatter then makes a placeholder), not be cached with the previous second's text:
    hypothesis found records stamped "[.000]" that way."""
    from mplog._common.format import Timestamps
    stamps = Timestamps()
    assert stamps.second(1.7e9) == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1.7e9))
    for _ in range(2):
        with pytest.raises((OverflowError, OSError, ValueError)):
            stamps.second(1e19)
    assert stamps.second(1.7e9 + 1) == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1.7e9 + 1))


@pytest.mark.parametrize("loop", ["python", "compiled"])
@pytest.mark.parametrize("field, plain, odd", [(7, 40, True), (7, 1, True), (9, 1, True), (9, 2, 2.0),
                                                (8, 1, True), (6, "/a/b.py", b"/a/b.py")])
def test_a_header_cache_hit_is_the_same_text(loop, field, plain, odd):
    """The hot loop caches a header by its fields. A field equal to another of a different type
    (True == 1, 2.0 == 2) must not be given the other's cached text: the general path writes
    ``[b.py:True]``, so must the loop."""
    def payload(value):
        fields = [1.7e9 + 0.25, 20, "INFO", "app", "done %s", ("x",), "/srv/app/stage.py", 40, "MainProcess", 1234,
                  None, None, None]
        fields[field] = value
        return _lean_payload(fields)
    payloads = [payload(plain), payload(odd), payload(plain)]
    texts, warnings, added, _ = _run_loop(loop, payloads, logging.INFO)
    assert texts == _general_path(payloads, logging.INFO)[0]


@pytest.mark.parametrize("loop", ["python", "compiled"])
def test_a_record_that_differs_from_the_one_before_in_one_header_field_gets_its_own_header(loop):
    """The compiled loop reuses the previous record's header while its six fields are equal. A
    record that differs in any one of them (each run twice, then the first again) is written
    with its own header, as the general path writes it, and none takes the general path."""
    base = [1.7e9 + 0.25, 20, "INFO", "app", "done %d", (1,), "/srv/app/a.py", 10, "MainProcess", 100,
            None, None, None]
    variants = [{}, {1: 30, 2: "WARNING"}, {3: "app.sub"}, {8: "Fork-1"}, {9: 101}, {6: "/srv/app/b.py"}, {7: 11}]
    payloads = []
    for change in variants:
        fields = list(base)
        for index, value in change.items():
            fields[index] = value
        payloads += [_lean_payload(fields)] * 2 + [_lean_payload(base)]
    texts, _, _, taken_by_general = _run_loop(loop, payloads, logging.DEBUG)
    assert texts == _general_path(payloads, logging.DEBUG)[0]
    assert taken_by_general == []
    headers = [line.split(b"] ", 1)[1] for line in texts[0].split(b"\n") if line.startswith(b"[20")]
    assert len(headers) == len(payloads) and len(set(headers)) == len(variants)


@pytest.mark.parametrize("loop", ["python", "compiled"])
@pytest.mark.parametrize("between", [{5: (2 ** 40,)}, {7: 2 ** 40}, {5: ((1, 2),)}, {10: (None, None, None)}])
def test_a_header_read_from_its_bytes_is_not_reused_once_a_record_read_by_marshal_changed_it(loop, between):
    """The compiled loop reads a common record from its bytes and keeps the header's bytes while
    they are those of the previous record's header. A record that its reader leaves to marshal (a
    big int, a nested argument, an exc_info tuple) and that has another header changes the
    previous header: the record after it, with the first header's bytes again, must get the first
    header, not the one in between. Messages change and repeat too."""
    first = [1.7e9 + 0.25, 20, "INFO", "app", "done %d", (1,), "/srv/app/a.py", 10, "MainProcess", 100,
             None, None, None]
    other = list(first)
    other[2:4] = ["WARNING", "app.other"]
    other[6] = "/srv/app/b.py"
    other[1] = 30
    other[4] = "other %s"
    for index, value in between.items():
        other[index] = value
    again = list(first)
    again[4:6] = ["done again %s", ("x",)]
    payloads = [_lean_payload(first), _lean_payload(other), _lean_payload(first), _lean_payload(again),
                _lean_payload(other), _lean_payload(again)]
    texts, _, _, taken_by_general = _run_loop(loop, payloads, logging.DEBUG)
    assert texts == _general_path(payloads, logging.DEBUG)[0]
    assert taken_by_general == []
    full = texts[0].decode()
    assert full.count("[INFO] [app] [MainProcess:100] [a.py:10]") == 4
    assert full.count("[WARNING] [app.other] ") == 2


@pytest.mark.parametrize("loop", ["python", "compiled"])
def test_a_record_the_general_path_fails_on_costs_that_record_only(loop, monkeypatch):
    """Whatever goes wrong decoding one record (a bug of ours, as the bytes exc_text was) is a
    counted placeholder: the loop goes on, and the records around it are written."""
    from mplog._listener import batch as _batch
    good = [_record.common_payload(logging.LogRecord("app", logging.INFO, "/a/b.py", 1, f"ok {i}", None, None),
                                   lean=True) for i in range(2)]
    poison = _lean_payload([1.7e9, 20, "INFO", "app", "poison", None, "/a/b.py", 1, "MainProcess", 1, None, "x", None])
    real = _batch.decode

    def decode(payload):
        if payload == poison:
            raise RuntimeError("a bug")
        return real(payload)

    monkeypatch.setattr(_batch, "decode", decode)
    (full, simp), _, added, general = _run_loop(loop, [good[0], poison, good[1]], logging.INFO)
    assert general == [poison] and added == 1
    assert b"<record from test could not be decoded: RuntimeError>" in full
    assert simp.count(b"ok ") == 2 and b"poison" not in full
