"""Syslog forwarding: the RFC 5424 / RFC 6587 encoding, and the forwarder against real receivers.

The encoding tests and the tests against small in-process TCP servers run everywhere. The
integration tests start a real rsyslog (``rsyslogd -n`` as a child of the test, its own config,
pid file and work directory in tmp_path, listening on a free 127.0.0.1 port, writing what it
receives to a file) and are skipped, with the reason, when rsyslogd is not installed
(CI installs it: ``apt-get install -y rsyslog``).
"""

from __future__ import annotations

import ast
import datetime
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import psutil
import pytest

import mplog._listener.syslog as syslog_mod
from mplog._common.record import Record, make_record
from mplog._listener.syslog import SD_ID, SyslogForwarder, format_rfc5424, severity

from conftest import wait_for

BOM = b"\xef\xbb\xbf"


def rec(msg: str = "hello", level: int = logging.INFO, name: str = "app.work", **fields: object) -> Record:
    fields.setdefault("pathname", "/srv/app/work.py")
    fields.setdefault("lineno", 42)
    fields.setdefault("processName", "SpawnProcess-1")
    fields.setdefault("process", 4242)
    fields.setdefault("threadName", "MainThread")
    created = float(fields.pop("created", 1_790_000_000.123456))  # type: ignore[arg-type]
    return make_record(created, level, name, msg, **fields)


# -- a small RFC 5424 parser, independent of the encoder ------------------------------------
HEADER = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")


def parse_sd(data: str) -> Tuple[Dict[str, Dict[str, str]], str]:
    """Parse STRUCTURED-DATA at the start of ``data``; return (elements, the rest)."""
    elements: Dict[str, Dict[str, str]] = {}
    if data.startswith("- "):
        return elements, data[2:]
    i = 0
    while i < len(data) and data[i] == "[":
        j = i + 1
        while data[j] not in " ]":
            j += 1
        sd_id = data[i + 1:j]
        params: Dict[str, str] = {}
        i = j
        while data[i] == " ":
            eq = data.index("=", i)
            name = data[i + 1:eq]
            assert data[eq + 1] == '"', data[i:]
            k = eq + 2
            value = []
            while data[k] != '"':
                if data[k] == "\\" and data[k + 1] in '"\\]':
                    value.append(data[k + 1])
                    k += 2
                else:
                    assert data[k] not in '"]', f"unescaped {data[k]!r} in a PARAM-VALUE"
                    value.append(data[k])
                    k += 1
            params[name] = "".join(value)
            i = k + 1
        assert data[i] == "]", data[i:]
        elements[sd_id] = params
        i += 1
    assert data[i] == " ", data[i:]
    return elements, data[i + 1:]


def parse(message: bytes) -> Dict[str, object]:
    """One unframed RFC 5424 message."""
    m = HEADER.match(message)
    assert m, message[:120]
    rest = message[m.end():].decode("utf-8")
    sd, msg = parse_sd(rest)
    bom = msg.startswith("\ufeff")  # MSG-UTF8 = BOM UTF-8-STRING
    return {"pri": int(m.group(1)), "timestamp": m.group(2).decode(), "hostname": m.group(3).decode(),
            "app": m.group(4).decode(), "procid": m.group(5).decode(), "msgid": m.group(6).decode(),
            "sd": sd, "bom": bom, "msg": msg[1:] if bom else msg}


def unframe(data: bytes) -> List[bytes]:
    """Split an RFC 6587 octet-counted stream; fails on anything else."""
    out = []
    i = 0
    while i < len(data):
        sp = data.index(b" ", i)
        count = data[i:sp]
        assert count.isdigit() and not count.startswith(b"0"), data[i:i + 20]
        n = int(count)
        out.append(data[sp + 1:sp + 1 + n])
        assert len(out[-1]) == n, "truncated frame"
        i = sp + 1 + n
    return out


# -- the encoding -----------------------------------------------------------------------------
@pytest.mark.parametrize("level,sev", [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                                       (logging.ERROR, 3), (logging.CRITICAL, 2), (5, 7), (25, 6), (35, 4),
                                       (45, 3), (60, 2)])
@pytest.mark.parametrize("facility", [0, 1, 16, 23])
def test_pri_is_facility_and_severity(level: int, sev: int, facility: int) -> None:
    assert severity(level) == sev
    data = format_rfc5424(rec(level=level), "host", "mplog", facility, framed=False)
    assert data.startswith(b"<%d>1 " % (facility * 8 + sev))


def test_octet_counting_counts_bytes() -> None:
    r = rec("naïve 日本語 \U0001F600")
    bare = format_rfc5424(r, "host", "mplog", 16, framed=False)
    framed = format_rfc5424(r, "host", "mplog", 16)
    assert framed == b"%d " % len(bare) + bare
    assert len(bare) > len(bare.decode("utf-8"))  # the count is of octets, not characters
    assert unframe(framed + framed) == [bare, bare]


def test_header_fields_and_timestamp() -> None:
    created = 1_790_000_000.654321
    data = format_rfc5424(rec(created=created, process=31337), "node-7", "mplog", 16, framed=False)
    p = parse(data)
    assert (p["hostname"], p["app"], p["procid"], p["msgid"]) == ("node-7", "mplog", "31337", "app.work")
    ts = str(p["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d", ts), ts
    parsed = datetime.datetime.fromisoformat(ts)
    assert abs(parsed.timestamp() - created) < 2e-6
    assert parsed.utcoffset() == datetime.datetime.fromtimestamp(created).astimezone().utcoffset()


def test_message_is_utf8_with_bom_and_traceback_appended() -> None:
    tb = 'Traceback (most recent call last):\n  File "w.py", line 3, in f\nValueError: bad'
    data = format_rfc5424(rec("failed on 3", level=logging.ERROR, exc_text=tb, exc_summary="ValueError: bad"),
                          "h", "a", 16, framed=False)
    sd_end = data.index(b"] ") + 2
    assert data[sd_end:sd_end + 3] == BOM
    assert data[sd_end + 3:].decode("utf-8") == "failed on 3\n" + tb
    assert parse(data)["msg"] == "failed on 3\n" + tb


def test_message_cannot_smuggle_control_characters() -> None:
    nasty = "a\rb\x1b[31mc\x00d\u202ee\udc80f"
    data = format_rfc5424(rec(nasty), "h", "a", 16, framed=False)
    msg = data[data.index(BOM) + 3:].decode("utf-8")  # a lone surrogate did not break the encoding
    assert msg == "a\\rb\\x1b[31mc\\x00d\\u202ee\\udc80f"


def test_structured_data_escapes_param_values() -> None:
    extras = {"quote": 'say "hi"', "backslash": "C:\\temp\\", "bracket": "a]b[c", "all": '\\"]',
              "newline": "one\ntwo", "unicode": "Zürich"}
    data = format_rfc5424(rec(extras=extras, pathname='/odd "dir"]/x.py', processName="P]1"), "h", "a", 16,
                          framed=False)
    text = data.decode("utf-8")
    assert 'quote="say \\"hi\\""' in text
    assert 'backslash="C:\\\\temp\\\\"' in text
    assert 'bracket="a\\]b[c"' in text
    sd = parse(data)["sd"]
    params = sd[SD_ID]  # type: ignore[index]
    assert params["process"] == "P]1" and params["file"] == '/odd "dir"]/x.py' and params["line"] == "42"
    for key in ("quote", "backslash", "bracket", "all", "unicode"):
        assert params[key] == extras[key]
    assert params["newline"] == "one\\ntwo"  # one line, escaped as in the log files


def test_sd_names_are_sanitised() -> None:
    extras = {"a b": "1", "x=y": "2", 'q"r': "3", "s]t": "4", "é": "5", "k" * 40: "6", "": "7",
              "process": "8", "line": "9"}
    data = format_rfc5424(rec(extras=extras), "h", "a", 16, framed=False)
    params = parse(data)["sd"][SD_ID]  # type: ignore[index]
    assert params["a_b"] == "1" and params["x_y"] == "2" and params["q_r"] == "3" and params["s_t"] == "4"
    assert params["_"] in ("5", "7")
    assert params["k" * 32] == "6"
    assert params["process"] == "SpawnProcess-1" and params["extra_process"] == "8"
    assert params["line"] == "42" and params["extra_line"] == "9"
    for name in params:
        assert 1 <= len(name) <= 32
        assert all(33 <= ord(c) <= 126 and c not in '= ]"' for c in name), name


@pytest.mark.parametrize("name,msgid", [("app.work", "app.work"), ("has space", "has_space"), ("", "-"),
                                        ("données", "donn_es"), ("x" * 50, "x" * 32), ("tab\there", "tab_here")])
def test_msgid_is_the_sanitised_logger_name(name: str, msgid: str) -> None:
    assert parse(format_rfc5424(rec(name=name), "h", "a", 16, framed=False))["msgid"] == msgid


def test_hostname_app_name_procid_sanitised() -> None:
    p = parse(format_rfc5424(rec(process=0), "my host", "my app" + "x" * 60, 16, framed=False))
    assert p["hostname"] == "my_host" and p["app"] == "my_app" + "x" * 42 and p["procid"] == "-"
    assert parse(format_rfc5424(rec(), "", "", 16, framed=False))["hostname"] == "-"


def test_no_pickle_anywhere() -> None:
    tree = ast.parse(Path(syslog_mod.__file__).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"pickle", "marshal", "shelve", "dill", "cloudpickle", "copyreg"}


# -- submit() ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_submit_below_level_is_cheap_and_never_raises() -> None:
    fwd = SyslogForwarder("127.0.0.1", free_port(), level=logging.WARNING, backoff_initial=5.0)
    try:
        r = rec(level=logging.DEBUG)
        for _ in range(20000):
            fwd.submit(r)  # below the level: turned away before anything is formatted or queued
        st = fwd.state()
        assert st["submitted"] == 0 and st["pending"] == 0 and st["dropped"] == 0
        fwd.submit(r._replace(levelno="not a level"))  # type: ignore[arg-type]  # never raises
        fwd.submit(None)  # type: ignore[arg-type]
        assert fwd.state()["submitted"] == 0
    finally:
        fwd.close(0.5)


def test_dead_syslog_never_blocks_and_counts_drops() -> None:
    port = free_port()  # nothing listens there: every connect is refused
    fwd = SyslogForwarder("127.0.0.1", port, buffer_size=100, backoff_initial=0.05, backoff_max=0.2)
    try:
        slowest = 0.0
        n = 5000
        for i in range(n):
            t0 = time.perf_counter()
            fwd.submit(rec(f"seq={i}"))
            slowest = max(slowest, time.perf_counter() - t0)
        wait_for(lambda: fwd.state()["last_error"], 5.0, "a connection error")
        st = fwd.state()
        assert st["connected"] is False and "ECONNREFUSED" in st["last_error"]
        assert st["submitted"] == n and st["pending"] == 100 and st["dropped"] == n - 100
        assert st["forwarded"] == 0 and st["lost"] == 0
        assert slowest < 0.2, f"a submit took {slowest * 1000:.1f} ms"
    finally:
        t0 = time.monotonic()
        fwd.close(0.3)
        assert time.monotonic() - t0 < 2.0
    st = fwd.state()
    assert st["dropped"] == n and st["pending"] == 0  # what close() could not send is counted too
    fwd.submit(rec("after close"))
    assert fwd.state()["dropped"] == n + 1


class StalledReceiver:
    """Accepts connections (the kernel does, from the backlog) and never reads a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def test_stalled_receiver_never_blocks_submit_and_close_is_bounded() -> None:
    rx = StalledReceiver()
    fwd = SyslogForwarder("127.0.0.1", rx.port, buffer_size=500)
    try:
        wait_for(lambda: fwd.state()["connected"], 5.0, "the connection")
        big = "x" * 2000
        slowest = 0.0
        n = 5000
        for i in range(n):
            t0 = time.perf_counter()
            fwd.submit(rec(f"seq={i} {big}"))
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.2, f"a submit took {slowest * 1000:.1f} ms"
        wait_for(lambda: fwd.state()["dropped"] > 0, 10.0, "drops while the receiver stalls")
        t0 = time.monotonic()
        fwd.close(0.5)
        assert time.monotonic() - t0 < 2.0
        st = fwd.state()
        assert st["forwarded"] + st["dropped"] + st["lost"] == n, st
        assert st["pending"] == 0 and st["in_flight"] == 0
        assert st["lost"] > 0 and st["resets"] == 1  # unacknowledged at the deadline: reset, counted
    finally:
        fwd.close(0.1)
        rx.close()


class PyReceiver:
    """A minimal in-process syslog receiver: reads octet-counted frames into a list."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.messages: List[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        data = b""
        with conn:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        self.messages = unframe(data)


def test_forwards_every_record_in_order_to_a_python_receiver() -> None:
    rx = PyReceiver()
    fwd = SyslogForwarder("127.0.0.1", rx.port, level=logging.INFO, hostname="node-1")
    n = 3000
    for i in range(n):
        fwd.submit(rec(f"seq={i}", extras={"i": str(i)}))
        fwd.submit(rec("below the level", level=logging.DEBUG))
    fwd.close(10.0)
    rx.thread.join(10.0)
    rx.sock.close()
    st = fwd.state()
    assert (st["submitted"], st["forwarded"], st["dropped"], st["lost"], st["pending"]) == (n, n, 0, 0, 0)
    assert [parse(m)["msg"] for m in rx.messages] == [f"seq={i}" for i in range(n)]
    assert [parse(m)["sd"][SD_ID]["i"] for m in rx.messages] == [str(i) for i in range(n)]  # type: ignore[index]
    assert st["connected"] is False and st["reconnects"] == 0 and st["resets"] == 0


# -- a real rsyslog ---------------------------------------------------------------------------
def find_rsyslogd() -> Optional[str]:
    # /usr/sbin is not on an unprivileged user's PATH on Debian, and CI may run as one.
    return shutil.which("rsyslogd") or next(
        (p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.access(p, os.X_OK)), None)


RSYSLOG_CONF = """\
# Written by tests/test_syslog.py: one imtcp input on loopback, everything to one file.
global(workDirectory="{work}" maxMessageSize="64k")
# One worker writes in the order messages were received; at SIGTERM, what was read is written.
main_queue(queue.workerThreads="1" queue.timeoutShutdown="10000")
module(load="imtcp")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="fromtest") {{
    action(type="omfile" file="{out}" template="raw")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="fromtest")
"""


class Rsyslog:
    """An rsyslogd of the test's own: ``-n`` keeps it in the foreground as our child."""

    def __init__(self, exe: str, directory: Path) -> None:
        self.exe = exe
        self.dir = directory
        self.port = free_port()
        self.out = directory / "received.log"
        self.conf = directory / "rsyslog.conf"
        self.pidfile = directory / "rsyslogd.pid"
        work = directory / "work"
        work.mkdir()
        self.conf.write_text(RSYSLOG_CONF.format(work=work, out=self.out, port=self.port), encoding="utf-8")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None
        self.starts += 1
        log = open(self.dir / f"rsyslogd.{self.starts}.out", "wb")
        with log:
            self.proc = subprocess.Popen([self.exe, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        proc = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 15.0
        while True:  # deadline loop on the observable condition: its socket listens on the port
            if self.proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited with {self.proc.returncode}: {self.output()}")
            try:
                conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
            except psutil.Error:
                conns = []
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"rsyslogd does not listen on {self.port}: {self.output()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM (rsyslog writes what it has read, then exits), SIGKILL if it hangs; reaped."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)

    def sessions(self) -> int:
        """Connections rsyslogd holds on its port besides the listening one."""
        if self.proc is None:
            return 0
        try:
            proc = psutil.Process(self.proc.pid)
            conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        except psutil.Error:
            return 0
        return sum(1 for c in conns if c.status != psutil.CONN_LISTEN and c.laddr.port == self.port)

    def output(self) -> str:
        return " | ".join(p.read_text(errors="replace").strip() for p in sorted(self.dir.glob("rsyslogd.*.out")))

    def received(self) -> List[Dict[str, object]]:
        if not self.out.exists():
            return []
        lines = self.out.read_bytes().split(b"\n")
        assert lines[-1] == b"", "a partial line at the end of rsyslog's file"
        return [parse(line) for line in lines[:-1]]


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    exe = find_rsyslogd()
    if exe is None:
        pytest.skip("rsyslogd not found (on PATH, /usr/sbin, /sbin): install it with "
                    "`apt-get install -y rsyslog` to run the syslog integration tests")
    rs = Rsyslog(exe, tmp_path)
    try:
        rs.start()
        yield rs
    finally:
        rs.stop()


def wait_final(rs: Rsyslog, timeout: float = 20.0) -> None:
    """After the forwarder's close(): once rsyslog has closed our session it has read every byte
    (it reads to the end of the stream); stopping it then writes what it read: the file is final."""
    wait_for(lambda: rs.sessions() == 0, timeout, "rsyslog to read our session to its end")
    rs.stop()


PROCS = 4


def submit_records(fwd: SyslogForwarder, n: int, start: int = 0, pace: int = 0,
                   stop: Optional[threading.Event] = None) -> int:
    """Records from PROCS simulated processes, interleaved; ``seq`` is global, ``i`` per process.
    ``pace``: pause 1 ms every ``pace`` records (pacing, not synchronisation)."""
    for k in range(start, start + n):
        if stop is not None and stop.is_set():
            return k - start
        p = k % PROCS
        fwd.submit(rec(f"seq={k}", process=1000 + p, processName=f"Worker-{p}",
                       extras={"seq": str(k), "i": str(k // PROCS), "sample": f'S"{k}]'}))
        if pace and k % pace == pace - 1:
            time.sleep(0.001)  # pacing the sender, not synchronising on it
    return n


def check_arrivals(received: List[Dict[str, object]]) -> List[int]:
    """No duplicates; per process in order; extras intact. Returns the global seqs arrived."""
    seqs = []
    last: Dict[str, int] = {}
    for p in received:
        params = p["sd"][SD_ID]  # type: ignore[index]
        seq = int(params["seq"])
        assert p["bom"] and p["msg"] == f"seq={seq}" and params["sample"] == f'S"{seq}]'
        assert p["procid"] == str(1000 + seq % PROCS) and params["process"] == f"Worker-{seq % PROCS}"
        assert int(params["i"]) == seq // PROCS and p["msgid"] == "app.work" and p["pri"] == 16 * 8 + 6
        proc = str(p["procid"])
        assert seq > last.get(proc, -1), f"out of order in process {proc}: {seq} after {last[proc]}"
        last[proc] = seq
        seqs.append(seq)
    assert len(seqs) == len(set(seqs)), "a record arrived twice"
    return seqs


def runs(missing: List[int]) -> int:
    return sum(1 for i, s in enumerate(missing) if i == 0 or missing[i - 1] != s - 1)


@pytest.mark.timeout(90)
def test_rsyslog_receives_every_record_once_in_order(rsyslog: Rsyslog) -> None:
    n = 20000
    fwd = SyslogForwarder("127.0.0.1", rsyslog.port, hostname="node-1", buffer_size=n)
    submit_records(fwd, n)
    fwd.close(30.0)
    st = fwd.state()
    assert (st["submitted"], st["forwarded"], st["dropped"], st["lost"]) == (n, n, 0, 0), st
    assert (st["pending"], st["in_flight"], st["reconnects"], st["resets"]) == (0, 0, 0, 0), st
    wait_final(rsyslog)
    received = rsyslog.received()
    assert sorted(check_arrivals(received)) == list(range(n))
    assert {p["hostname"] for p in received} == {"node-1"}


@pytest.mark.timeout(90)
def test_rsyslog_restart_between_records_loses_nothing(rsyslog: Rsyslog) -> None:
    """rsyslog stops (SIGTERM) after reading everything sent so far, while submitting goes on:
    the forwarder sees the receiver's clean close, buffers, reconnects; nothing is lost."""
    fwd = SyslogForwarder("127.0.0.1", rsyslog.port, buffer_size=100000, backoff_initial=0.05)
    first = submit_records(fwd, 2000)
    wait_for(lambda: fwd.state()["forwarded"] == first, 10.0, "the first records acknowledged")
    wait_for(lambda: rsyslog.out.exists() and rsyslog.out.read_bytes().count(b"\n") == first, 10.0,
             "the first records written")
    rsyslog.stop()
    wait_for(lambda: not fwd.state()["connected"], 10.0, "the forwarder to notice the close")
    more = submit_records(fwd, 2000, start=first)  # rsyslog is down: these wait in the buffer
    rsyslog.start()
    more += submit_records(fwd, 2000, start=first + more)
    fwd.close(30.0)
    st = fwd.state()
    n = first + more
    assert st["reconnects"] >= 1 and st["resets"] == 0, st
    assert (st["submitted"], st["forwarded"], st["dropped"], st["lost"], st["pending"]) == (n, n, 0, 0, 0), st
    wait_final(rsyslog)
    assert sorted(check_arrivals(rsyslog.received())) == list(range(n))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("buffer_size", [1_000_000, 200])
def test_rsyslog_restart_mid_stream_counts_the_losses(
        rsyslog: Rsyslog, record_property: Callable[[str, object], None], buffer_size: int) -> None:
    """rsyslog is stopped (SIGTERM) and started again on the same port while records stream in.

    Exact: the forwarder's own accounting (forwarded + dropped + lost = submitted), no record
    twice, every process's records in order, nothing missing but around the break(s), and no
    record counted lost or dropped that arrived. What plain TCP syslog cannot tell a sender:
    rsyslog resets a connection whose socket still holds bytes it had acknowledged but not
    read, and discards them; those records count as forwarded. Such a shortfall is allowed
    only after a reset the forwarder reports, and only next to a break. With a small buffer,
    records are dropped too (the oldest, while rsyslog is down), and counted.
    """
    fwd = SyslogForwarder("127.0.0.1", rsyslog.port, buffer_size=buffer_size, backoff_initial=0.05)
    limit = 200_000
    stop = threading.Event()
    done: List[int] = []
    # Submits until told to stop (or the limit): the restart happens while it runs.
    submitter = threading.Thread(target=lambda: done.append(submit_records(fwd, limit, pace=20, stop=stop)))
    submitter.start()
    try:
        wait_for(lambda: fwd.state()["forwarded"] >= 5000, 30.0, "5000 records forwarded")
        rsyslog.stop()
        rsyslog.start()
        wait_for(lambda: fwd.state()["reconnects"] >= 1, 30.0, "the reconnection")
        after = fwd.state()["forwarded"] + 5000
        wait_for(lambda: fwd.state()["forwarded"] >= after, 30.0, "5000 more records forwarded")
        assert submitter.is_alive(), "the submitter must still run after the restart"
    finally:
        stop.set()
        submitter.join(10.0)
    assert len(done) == 1 and done[0] < limit
    n = done[0]
    fwd.close(30.0)
    st = fwd.state()
    assert st["pending"] == 0 and st["in_flight"] == 0, st
    assert st["forwarded"] + st["dropped"] + st["lost"] == st["submitted"] == n, st
    assert st["reconnects"] >= 1, st
    wait_final(rsyslog)
    arrived = check_arrivals(rsyslog.received())
    shortfall = n - len(arrived) - st["dropped"] - st["lost"]
    missing = sorted(set(range(n)) - set(arrived))
    record_property("syslog_restart", {**st, "arrived": len(arrived), "shortfall": shortfall,
                                       "missing_runs": runs(missing)})
    print(f"restart mid-stream: arrived {len(arrived)}, unseen shortfall {shortfall}, state {st}")
    assert 0 <= shortfall, "a record counted lost or dropped arrived after all"
    if st["resets"] == 0:
        assert shortfall == 0, "a clean close lost acknowledged records"
    if buffer_size > limit:
        # Nothing dropped, and nothing missing away from a break: each broken connection
        # leaves one run (the records rsyslog discarded, then those in flight).
        assert st["dropped"] == 0
        assert runs(missing) <= st["reconnects"], (runs(missing), missing[:20])


def test_service_forwards_records_from_every_process(rsyslog, service, ctx):
    """End to end: LogService(syslog=...) in the listener; records from pool workers and the
    main process reach rsyslog once each, in order per process, at or above syslog_level;
    health shows the forwarder's state."""
    import workers
    from concurrent.futures import ProcessPoolExecutor

    svc = service(syslog=f"127.0.0.1:{rsyslog.port}", syslog_level="INFO")
    logging.getLogger("main").debug("not forwarded")
    with ProcessPoolExecutor(2, mp_context=ctx, **svc.pool_kwargs()) as pool:
        list(pool.map(workers.log_n, [(f"sys{k}", 100) for k in range(3)]))
    logging.getLogger("main").warning("forwarded %s", "too", extra={"sample": "S1"})
    assert svc.flush(20)
    wait_for(lambda: svc.health()["syslog"]["forwarded"] >= 301, 20, "forwarding")
    h = svc.health()["syslog"]
    assert h["connected"] and h["dropped"] == h["lost"] == 0
    svc.stop()
    wait_final(rsyslog)
    got = rsyslog.received()
    msgs = [str(m["msg"]).lstrip("\ufeff") for m in got]
    assert "not forwarded" not in msgs
    for k in range(3):
        assert [m for m in msgs if m.startswith(f"sys{k} ")] == [f"sys{k} item {i}" for i in range(100)]
    last = [m for m in got if str(m["msg"]).lstrip("\ufeff") == "forwarded too"]
    assert len(last) == 1 and last[0]["sd"]["mplog@32473"]["sample"] == "S1"
