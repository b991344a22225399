"""The divert to stderr, in-process: a record that cannot go to the files (its service stopped)
is printed on the process's stderr as its simplified line, made from the LogRecord and from the
text the handler's formatter made of it, never by decoding the payload made of them (issue 31)."""

from __future__ import annotations

import logging
import sys

import pytest

import mplog._common.record as record_module
from mplog._app.handler import Channel, SpoolHandler, close_channel
from mplog._common.config import WorkerConfig
from mplog._common.counters import Counters


def _config(tmp_path, service_id):
    runtime = tmp_path / "spool"
    runtime.mkdir(mode=0o700)
    Counters.create(str(runtime / "counters"))
    return WorkerConfig(fifo_path=str(runtime / "fifo"), counters_path=str(runtime / "counters"), level=10,
                        overflow="drop", overflow_timeout=0.0, capture_warnings=False, service_id=service_id,
                        queue_size=100)


@pytest.fixture
def no_decoding(monkeypatch):
    """The payload decoders raise: a divert that decodes its payload prints nothing."""
    def refuse(payload):
        raise AssertionError("the divert decoded a payload")
    monkeypatch.setattr(record_module, "decode", refuse)
    monkeypatch.setattr(record_module, "deserialize", refuse)


def _exc_info():
    try:
        raise KeyError("missing")
    except KeyError:
        return sys.exc_info()


@pytest.mark.parametrize("level, args, exc, line", [
    (logging.INFO, (42,), None, "hello 42\n"),  # a common record: its message never rendered before
    (logging.WARNING, (42,), None, "WARNING: hello 42\n"),
    (logging.ERROR, (42,), "exc", "ERROR: hello 42 (KeyError: 'missing')\n"),  # flattened in the caller
    (logging.INFO, ("a", "b"), None, "hello %d <formatting failed: TypeError"),  # still a line, marked
])
def test_a_record_after_stop_goes_to_stderr_as_its_line_without_decoding(tmp_path, capfd, no_decoding,
                                                                        level, args, exc, line):
    channel = Channel(_config(tmp_path, "divert-channel"))
    channel.close()  # the service stopped: what this process puts now goes to stderr
    rec = logging.LogRecord("app", level, __file__, 1, "hello %d", args, _exc_info() if exc else None)
    channel.put_nowait(rec)
    err = capfd.readouterr().err
    assert err.startswith("[") and line in err, err
    assert err.count("\n") == 1


def test_a_formatted_record_goes_to_stderr_with_its_formatters_text(tmp_path, capfd, no_decoding):
    """With a formatter on the handler, the line carries the text it made, as the file would."""
    cfg = _config(tmp_path, "divert-handler")
    handler = SpoolHandler(cfg)
    handler.setFormatter(logging.Formatter("<%(name)s> %(message)s"))
    close_channel(cfg)
    handler.channel.close()
    handler.handle(logging.LogRecord("app", logging.INFO, __file__, 1, "hello %s", ("you",), None))
    err = capfd.readouterr().err
    assert "] <app> hello you\n" in err, err
