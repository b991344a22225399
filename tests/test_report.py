"""``python -m mplog report``: the HTML page of a run (issue 32).

A real run (a pool worker SIGKILLed, a Process raising, a warning storm) is reported and the page
is read back: one timeline row per process of the log, the deaths, the groups, the counts. Bad
input exits 2 with a message naming what is wrong. A large synthetic log gives a bounded page.
"""

from __future__ import annotations

import gzip
import html
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_blocks, wait_for

import report_workers
import workers

ROOT = Path(__file__).resolve().parent.parent
SEP = "-" * 72


def report(directory: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mplog", "report", str(directory), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def make_run(service, ctx, tmp_path: Path):
    """A run with a SIGKILLed pool worker, a Process that raises, and a storm of 300 warnings."""
    svc = service()
    pool = ctx.Pool(1, **svc.pool_kwargs())
    try:
        pool.apply_async(workers.crash, ("sigkill",))
        wait_for(lambda: svc.health()["workers"]["abnormal"] >= 1, 30, "the SIGKILLed worker reported")
        assert pool.apply(report_workers.storm, (300,)) == 300
    finally:
        pool.terminate()
        pool.join()
    p = ctx.Process(target=workers.crash_target, args=(svc.worker_config, "raise", str(tmp_path / "err")))
    p.start()
    p.join(60)
    assert p.exitcode == 1
    wait_for(lambda: svc.health()["workers"]["abnormal"] >= 2, 30, "the raising process reported")
    assert svc.flush(30)
    svc.stop()
    return svc


def test_report_of_a_real_run(service, ctx, tmp_path):
    """The page has one timeline row per (process, pid) of the full log, the SIGKILL and the
    uncaught exception as deaths with their marks, the storm as one group of 300, and the stop
    report's accounting."""
    svc = make_run(service, ctx, tmp_path)
    blocks = read_blocks(svc.full_path)
    result = report(svc.full_path.parent)
    assert result.returncode == 0, result.stderr
    page = (svc.full_path.parent / "run.report.html").read_text(encoding="utf-8")
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "<link" not in page and " src=" not in page
    rows = [html.unescape(r) for r in re.findall(r'<g class="row" data-process="([^"]*)"', page)]
    expected = {f"{b['process']}:{b['pid']}" for b in blocks}
    assert sorted(rows) == sorted(expected)
    deaths = re.findall(r'<g class="mk death" data-k="\d+">.*?font-weight="bold">([^<]*)</text>', page)
    assert sorted(deaths) == ["EXIT(1)", "SIGKILL(-9)"], deaths
    table = page.split('<table class="deaths">', 1)[1].split("</table>", 1)[0]
    assert "was killed by SIGKILL" in table and "exited with status 1" in table
    groups = page.split('<table class="groups">', 1)[1].split("</table>", 1)[0]
    storm = [r for r in groups.split("<tr>") if "loss=# at step # for &#x27;…&#x27;" in r]
    assert len(storm) == 1 and '<td class="n">300</td>' in storm[0], storm
    written = re.search(r"mplog stopped: (\d+) records written", svc.full_path.read_text()).group(1)
    assert f"{int(written):,} written, 0 dropped" in page
    assert f"<td>records</td><td>{len(blocks):,}</td>" in page


def _block(t: float, level: str, logger: str, proc: str, pid: int, msg: str, extra: str = "") -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"
    return f"[{stamp}] [{level}] [{logger}] [{proc}:{pid}] [x.py:1]\n  Message: {msg}\n{extra}{SEP}\n"


def _write(path: Path, n: int, t0: float = 1.7e9) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(_block(t0 + i * 0.01, "WARNING" if i % 10 == 0 else "INFO", "app", "W", i % 4, f"step {i}"))


BAD = [  # name, how the directory is made, exit status, words of the message, page written
    ("empty", lambda d: None, 2, "no full log in", False),
    ("custom-format", lambda d: (d / "run.debug.log").write_text("2024-01-01 12:00:00 INFO hello\n"), 2,
     "run.debug.log:1: not a record header", False),
    ("unindented", lambda d: (d / "run.debug.log").write_text(_block(1.7e9, "INFO", "a", "P", 1, "x")
                                                                 .replace(SEP, "oops\n" + SEP)), 2,
     "run.debug.log:3: a line inside the block", False),
    ("truncated", lambda d: (d / "run.debug.log").write_text(_block(1.7e9, "INFO", "a", "P", 1, "x")
                                                                + "[2023-11-14 22:13:21.000] [ERROR] [a] [P:1] [x.py:1]\n  Message: cut"),
     2, "run.debug.log:4: the last block has no separator", True),
    ("corrupt-gz", lambda d: ((d / "run.debug.log.20240101-000000.gz").write_bytes(
        gzip.compress(_block(1.6e9, "INFO", "a", "P", 1, "old").encode())[:-12] + b"garbage!"),
        (d / "run.debug.log").write_text(_block(1.7e9, "INFO", "a", "P", 2, "new"))), 2,
     "run.debug.log.20240101-000000.gz: unreadable", True),
]


@pytest.mark.parametrize("name,make,status,words,page", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_a_message(tmp_path, name, make, status, words, page):
    """Each bad input: exit 2, a message naming the file (and line); a page from the rest where
    the rest can be read."""
    make(tmp_path)
    result = report(tmp_path)
    assert result.returncode == status, (result.stdout, result.stderr)
    assert words in result.stderr, result.stderr
    out = tmp_path / "run.report.html"
    assert out.exists() == page
    if name == "corrupt-gz":
        text = out.read_text()
        assert "P:2" in text and "unreadable" in text
    if name == "truncated":
        assert "<td>records</td><td>2</td>" in out.read_text()


def test_rotated_copies_are_read_oldest_first(tmp_path):
    """A numbered copy (.2 older than .1), a timestamped gzip copy and the live file: all read."""
    (tmp_path / "run.debug.log.2").write_text(_block(1.7e9, "INFO", "a", "P", 1, "two"))
    (tmp_path / "run.debug.log.1").write_text(_block(1.7e9 + 1, "INFO", "a", "P", 1, "one"))
    with gzip.open(tmp_path / "run.debug.log.20240101-000000.gz", "wt") as f:
        f.write(_block(1.7e9 - 5, "INFO", "a", "P", 1, "zero"))
    (tmp_path / "run.debug.log").write_text(_block(1.7e9 + 2, "ERROR", "a", "P", 1, "live"))
    sys.path.insert(0, str(ROOT))
    from mplog._report.reader import LogReader
    assert [b.message for b in LogReader(str(tmp_path))] == ["zero", "two", "one", "live"]


def test_page_size_is_bounded_for_a_large_log(tmp_path):
    """200,000 records of 4 processes, a warning every tenth, and 5,000 processes of one record:
    the page stays under 3 MB and says what it does not show."""
    _write(tmp_path / "run.debug.log", 200_000)
    with open(tmp_path / "run.debug.log", "a") as f:
        for pid in range(5000):
            f.write(_block(1.7e9 + 3000, "ERROR", "b", "Many", 10_000 + pid, f"failed {pid} {'x' * 1500}"))
    result = report(tmp_path, "-o", str(tmp_path / "out.html"))
    assert result.returncode == 0, result.stderr
    size = (tmp_path / "out.html").stat().st_size
    assert size < 3_000_000, size
    text = (tmp_path / "out.html").read_text()
    assert "The timeline shows 1000 of 5004 processes" in text
    assert "<td>records</td><td>205,000</td>" in text
