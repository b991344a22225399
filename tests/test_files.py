"""The files: rotation, retention, gzip, logrotate (create and copytruncate), deletion,
formats, permissions, symlinks, and real I/O faults (a full filesystem, a file size limit)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import pytest

import mplog
from mplog._listener.files import rotated_files
from conftest import app_blocks, read_blocks, wait_for

import workers


def _all_messages(path: Path):
    """Application messages of a full log and its rotated copies (gzip or not), oldest first."""
    msgs = []
    for p in rotated_files(str(path)) + [str(path)]:
        data = gzip.open(p).read() if p.endswith(".gz") else Path(p).read_bytes()
        tmp = path.parent / "_check.log"
        tmp.write_bytes(data)
        msgs += [b["message"] for b in app_blocks(tmp)]
        tmp.unlink()
    return msgs


def test_size_rotation_with_workers_keeps_every_record(service, ctx):
    # Size is checked after each batch: batches of 100 records make several rotations of 20 kB.
    svc = service(rotate_bytes=20_000, backup_count=1000, flush_count=100)
    with ProcessPoolExecutor(2, mp_context=ctx, **svc.pool_kwargs()) as pool:
        list(pool.map(workers.log_n, [(f"rot{k}", 300) for k in range(4)]))
    assert svc.flush(30)
    assert svc.health()["rotations"] >= 5
    svc.stop()
    rotated = rotated_files(str(svc.full_path))
    assert len(rotated) >= 5
    msgs = _all_messages(svc.full_path)
    for k in range(4):
        assert [m for m in msgs if m.startswith(f"rot{k} ")] == [f"rot{k} item {i}" for i in range(300)]
    assert len(msgs) == 1200


def test_retention_and_gzip(service):
    svc = service(rotate_bytes=5_000, backup_count=2, compress=True)
    log = logging.getLogger("gz")
    for round_ in range(5):
        rot = svc.health()["rotations"]
        for i in range(60):
            log.info("round %d line %d %s", round_, i, "g" * 40)
        assert svc.flush(10)
        assert svc.health()["rotations"] > rot  # size rotation happens right after the write
    svc.stop()
    for path in (svc.full_path, svc.simplified_path):
        kept = rotated_files(str(path))
        assert len(kept) == 2, kept
        assert all(p.endswith(".gz") for p in kept)
        for p in kept:
            assert gzip.open(p).read()  # valid gzip, not empty


def test_time_rotation(service):
    svc = service(rotate_interval=1.0, backup_count=10)
    log = logging.getLogger("t")
    log.info("first file")
    assert svc.flush(10)
    wait_for(lambda: svc.health()["rotations"] >= 2, what="a time rotation")  # both files rotated
    log.info("second file")
    svc.stop()
    assert _all_messages(svc.full_path) == ["first file", "second file"]
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["second file"]


@pytest.mark.parametrize("how", ["notice", "sighup", "reopen"])
def test_logrotate_create_mode(service, how):
    """logrotate moves the file away (create mode); the listener continues in a new file and
    never writes the moved one again; nothing is lost."""
    svc = service()
    log = logging.getLogger("lr")
    log.info("before rotate")
    assert svc.flush(10)
    moved = svc.full_path.with_name("run.debug.log.1")
    os.rename(svc.full_path, moved)
    os.rename(svc.simplified_path, svc.simplified_path.with_name("run.log.1"))
    if how == "sighup":
        os.kill(svc.health()["listener"]["pid"], signal.SIGHUP)
    elif how == "reopen":
        svc.reopen()
    wait_for(lambda: svc.full_path.exists() and svc.simplified_path.exists(), what="new files")
    log.info("after rotate")
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(moved)] == ["before rotate"]
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["after rotate"]


def test_logrotate_copytruncate(service):
    svc = service()
    log = logging.getLogger("ct")
    for i in range(50):
        log.info("before %d", i)
    assert svc.flush(10)
    copy = svc.full_path.with_name("copy.log")
    copy.write_bytes(svc.full_path.read_bytes())
    os.truncate(svc.full_path, 0)
    for i in range(50):
        log.info("after %d", i)
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == [f"after {i}" for i in range(50)]
    assert len(app_blocks(copy)) == 50


def test_deleted_file_is_recreated(service):
    svc = service()
    log = logging.getLogger("del")
    log.info("one")
    assert svc.flush(10)
    svc.full_path.unlink()
    wait_for(svc.full_path.exists, what="the file to be recreated")
    log.info("two")
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["two"]
    assert svc.health()["reopens"] >= 1


def test_jsonl_and_custom_formats(service, ctx):
    svc = service(full_format="jsonl", simplified_format="%(levelname)s|%(name)s|%(message)s|%(sample)s")
    with ProcessPoolExecutor(1, mp_context=ctx, **svc.pool_kwargs()) as pool:
        pool.submit(workers.log_exception, "J").result(60)
    logging.getLogger("j").info("multi\nline \x1b[2J", extra={
        "sample": "S1", "message_id": 7, "score": 0.5, "ok": True, "none": None, "tags": ["a", 1],
        "nested": {"k": [1.5, {"x": None}]}, "obj": object(), "nan": float("nan")})
    assert svc.flush(10)
    lines = svc.full_path.read_text().splitlines()
    objs = [json.loads(ln) for ln in lines]
    app = [o for o in objs if o["logger"] != "mplog"]
    assert len(app) == 2
    exc, multi = app
    assert exc["level"] == "ERROR" and exc["message"] == "J failed" and "ValueError: bad input" in exc["exception"]
    assert exc["file"].endswith("workers.py") and isinstance(exc["line"], int) and exc["pid"] > 0
    assert multi["message"] == "multi\nline \x1b[2J" and multi["sample"] == "S1"
    # JSON keeps the types: numbers, booleans, null, lists and dicts; anything else its repr.
    assert (multi["message_id"], multi["score"], multi["ok"], multi["none"]) == (7, 0.5, True, None)
    assert multi["tags"] == ["a", 1] and multi["nested"] == {"k": [1.5, {"x": None}]}
    assert multi["obj"].startswith("<object object at ") and multi["nan"] == "nan"
    assert {"timestamp", "process", "thread", "function"} <= set(multi)
    simple = svc.simplified_path.read_text()
    assert "INFO|j|multi\n    line \\x1b[2J|S1\n" in simple


def test_file_mode(service):
    svc = service(file_mode=0o640)
    logging.getLogger("m").info("x")
    assert svc.flush(10)
    assert stat.S_IMODE(svc.full_path.stat().st_mode) == 0o640
    assert stat.S_IMODE(svc.simplified_path.stat().st_mode) == 0o640


def test_files_follow_umask_by_default(tmp_path):
    old = os.umask(0o027)
    try:
        with mplog.LogService(tmp_path / "u") as svc:
            logging.getLogger("u").info("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(svc.full_path.stat().st_mode) == 0o640


def test_symlink_at_log_path_is_not_followed_where_others_can_write(tmp_path):
    """In a directory others can write (like /tmp), a link at the log path may have been
    planted: refused, naming the path and why; the target is untouched."""
    target = tmp_path / "victim"
    target.write_text("precious\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    (logs / "run.debug.log").symlink_to(target)
    svc = mplog.LogService(logs)
    with pytest.raises(OSError, match="run.debug.log") as info:
        svc.start()
    assert "others can write" in str(info.value)
    assert target.read_text() == "precious\n"


def test_symlink_in_the_users_own_directory_is_followed(tmp_path):
    """In a directory only its owner can write, a link at the log path is the user's own
    choice, and is followed like a FileHandler would (not reopened every second either)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    (logs / "run.debug.log").symlink_to(elsewhere / "real.debug.log")
    with mplog.LogService(logs) as svc:
        logging.getLogger("link").info("through the link")
        assert svc.flush(10)
        reopens = svc.health()["reopens"]
    assert [b["message"] for b in app_blocks(elsewhere / "real.debug.log")] == ["through the link"]
    assert (logs / "run.debug.log").is_symlink() and reopens == 0


@pytest.fixture
def small_fs(tmpfs):
    return tmpfs("small", "256k")


def test_disk_full_degrades_then_resumes(small_fs, capfd):
    """ENOSPC on a real filesystem: callers never raise; health is degraded naming the error;
    the records go to stderr, counted; when space returns, writing to the file resumes."""
    svc = mplog.LogService(small_fs / "logs", shutdown_timeout=10, degraded_window=2.0)
    with svc:
        log = logging.getLogger("full")
        log.info("fits")
        assert svc.flush(10)
        filler = small_fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass  # ENOSPC: the filesystem is full
        finally:
            os.close(fd)
        for i in range(20):
            log.info("no space %d %s", i, "n" * 200)
        assert svc.flush(10) is False  # on stderr, not in the file: flush() says so (issue 30)
        h = svc.health()
        assert h["status"] == "degraded"
        assert "No space left on device" in h["last_error"]["message"]
        assert h["records"]["diverted"] >= 1
        assert "no space 19" in capfd.readouterr().err
        filler.unlink()
        log.info("space is back")
        assert svc.flush(10)
        wait_for(lambda: svc.health()["status"] == "healthy", what="recovery")
    r = svc.health()["records"]
    assert r["sent"] == r["written"] + r["diverted"] + r["dropped"] + r["lost"] == 22
    msgs = [b["message"] for b in app_blocks(svc.full_path)]
    assert msgs[0] == "fits" and msgs[-1] == "space is back"
    read_blocks(svc.full_path)  # no half block left by the failed writes


def test_file_size_limit_efbig(service, capfd):
    """RLIMIT_FSIZE on the listener: EFBIG (and no SIGXFSZ death); degraded; resumes."""
    svc = service()
    log = logging.getLogger("fsize")
    log.info("small")
    assert svc.flush(10)
    listener = psutil.Process(svc.health()["listener"]["pid"])
    size = svc.full_path.stat().st_size
    hard = listener.rlimit(psutil.RLIMIT_FSIZE)[1]
    listener.rlimit(psutil.RLIMIT_FSIZE, (size + 100, hard))  # a soft limit: raising it back is allowed
    log.info("too big %s", "b" * 500)
    assert svc.flush(10) is False  # on stderr, not in the file: flush() says so (issue 30)
    h = svc.health()
    assert h["status"] == "degraded" and "too large" in h["last_error"]["message"].lower()
    assert listener.is_running() and h["restarts"] == 0
    listener.rlimit(psutil.RLIMIT_FSIZE, (hard, hard))
    log.info("fits again")
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["small", "fits again"]
    assert "too big" in capfd.readouterr().err


def test_file_replaced_by_directory_during_run(service):
    svc = service()
    log = logging.getLogger("dir")
    log.info("before")
    assert svc.flush(10)
    svc.full_path.unlink()
    svc.full_path.mkdir()
    wait_for(lambda: svc.health()["status"] == "degraded", what="degraded")
    log.info("while broken")
    assert svc.flush(10) is False  # on stderr, not in the file: flush() says so (issue 30)
    assert "run.debug.log" in svc.health()["last_error"]["message"]
    svc.full_path.rmdir()
    wait_for(svc.full_path.is_file, what="the file back")
    log.info("after")
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["after"]
    r = svc.stop()["records"]
    assert r["diverted"] == 1 and r["written"] == 2
