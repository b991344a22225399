"""Bad options fail at the boundary, naming the option or the path."""

from __future__ import annotations

import logging
import os
import stat

import pytest

import mplog


@pytest.mark.parametrize("option, value", [
    ("level", "LOUD"), ("level", -1), ("level", 1.5), ("level", True),
    ("simplified_level", "nope"), ("console", "chatty"),
    ("queue_size", 0), ("queue_size", 2.5), ("queue_size", "10"),
    ("overflow", "explode"), ("overflow_timeout", -0.1), ("overflow_timeout", float("nan")),
    ("flush_interval", 0), ("flush_count", 0), ("shutdown_timeout", -1),
    ("capture_warnings", "yes"), ("name", ""), ("name", "a/b"),
])
def test_bad_option_raises_value_error_naming_it(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        mplog.LogService(tmp_path, **{option: value})


def test_unknown_option(tmp_path):
    """A keyword-only signature: Python's own TypeError names the option; the declarative
    path (ServiceHandler, dictConfig) raises ValueError naming it."""
    with pytest.raises(TypeError, match="flush_cont"):
        mplog.LogService(tmp_path, flush_cont=3)
    with pytest.raises(ValueError, match="flush_cont"):
        mplog.ServiceHandler(tmp_path, flush_cont=3)


@pytest.mark.parametrize("kwargs, words", [
    ({"directory": ""}, ["directory"]),
    ({"directory": "x", "restart_backoff_initial": 9.0}, ["restart_backoff_initial", "restart_backoff_max"]),
])
def test_bad_values_and_combinations_are_named(tmp_path, kwargs, words):
    with pytest.raises(ValueError) as info:
        mplog.LogService(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_the_signature_shows_every_option():
    import inspect
    from mplog._common.config import ServiceConfig
    params = inspect.signature(mplog.LogService).parameters
    options = {f for f in ServiceConfig._fields} - {"directory", "name"}
    assert options <= set(params) and all(params[o].kind is inspect.Parameter.KEYWORD_ONLY for o in options)
    assert all(f":param {o}:" in mplog.LogService.__init__.__doc__ for o in options)


def test_levels_accept_names_and_numbers(tmp_path):
    svc = mplog.LogService(tmp_path, level="info", simplified_level=logging.WARNING, console="error")
    assert (svc.config.level, svc.config.simplified_level, svc.config.console) == (20, 30, 40)


def test_directory_created(tmp_path):
    with mplog.LogService(tmp_path / "a" / "b") as svc:
        logging.getLogger("x").info("hi")
    assert svc.full_path.is_file() and svc.simplified_path.is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory_oserror_names_path(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(OSError, match=str(d)):
        mplog.LogService(d).start()


def test_directory_is_a_file_oserror_names_path(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError, match=str(f)):
        mplog.LogService(f).start()
    with pytest.raises(OSError, match=str(f)):
        mplog.LogService(f / "sub").start()


def test_log_file_is_a_directory_oserror_names_path(tmp_path):
    (tmp_path / "run.debug.log").mkdir()
    with pytest.raises(OSError, match="run.debug.log"):
        mplog.LogService(tmp_path).start()


def test_worker_config_before_start(tmp_path):
    with pytest.raises(RuntimeError, match="not started"):
        mplog.LogService(tmp_path).worker_config


def test_worker_init_never_raises_and_falls_back_to_stderr(capfd):
    root = logging.getLogger()
    bad = mplog.WorkerConfig(fifo_path="/nonexistent/fifo", counters_path="/nonexistent/counters", level=10,
                             overflow="block", overflow_timeout=0.01, capture_warnings=False, service_id="x")
    mplog.worker_init(bad)  # must not raise
    assert [type(h).__name__ for h in root.handlers] == ["StreamHandler"]
    logging.getLogger("fallback").warning("still visible")
    err = capfd.readouterr().err
    assert "logs to stderr" in err and "still visible" in err
    mplog.worker_init("not json at all")  # must not raise either
