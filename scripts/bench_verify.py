"""The benchmark's records and their verification: what every worker logs, and the readers that
find each record in the output file(s) exactly once and intact.

A record is ``w{wid} processed item {i} of {n}: loss={x}``, its loss derived from (wid, i), so
that a torn, mixed or misattributed record cannot pass for an intact one. Warm-up records
(``w{wid} warmup {j}``) are counted apart. The files are read as raw bytes (``_toolkit``): an
undecodable byte fails a pattern and counts torn.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from _toolkit import MESSAGE, SIMPLE_LINE, Tally, read_blocks, read_lines

MSG = "w%d processed item %d of %d: loss=%.6f"
WARM_MSG = "w%d warmup %d"
LOGURU_MSG = "w{} processed item {} of {}: loss={:.6f}"
LOGURU_WARM_MSG = "w{} warmup {}"
LOGGER_NAME = "bench"
WARMUP = 100  # warm-up records per worker, logged before the workers are released together
# The module whose worker_main makes the logging calls: mplog's full log names it in each header.
CALLER_FILE = b"bench_run.py"

BODY_RE = re.compile(rb"w(\d+) (?:processed item (\d+) of (\d+): loss=(\d\.\d{6})|warmup (\d+))\Z")
LINE_RE = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d{3} (?P<lvl>[A-Z]+) (?P<pn>\S+) (?P<lg>\S+): "
                     rb"(?P<body>.*)\Z", re.S)


def loss_value(wid: int, i: int) -> float:
    """The value worker ``wid`` logs for item ``i``: deterministic, so the verifier can check it."""
    return ((wid * 1000003 + i) * 0.6180339887498949) % 1.0


def worker_name(wid: int) -> str:
    return f"bench-w{wid}"


class Findings:
    """One file's verdict: which (worker, item) records it holds (a ``_toolkit.Tally`` keyed by
    ``(wid, 0)``), the warm-up lines, what is torn and mplog's own notices."""

    def __init__(self, procs: int, n: int) -> None:
        self.procs = procs
        self.n = n
        self.tally = Tally()
        self.warmup = 0
        self.torn = 0
        self.notices: List[str] = []
        self.examples: List[str] = []

    def body(self, body: bytes, wid_check: Optional[Callable[[int], bool]] = None) -> bool:
        m = BODY_RE.match(body)
        if not m:
            return False
        wid = int(m.group(1))
        if wid >= self.procs or (wid_check is not None and not wid_check(wid)):
            return False
        if m.group(5) is not None:
            self.warmup += 1
            return True
        i, of = int(m.group(2)), int(m.group(3))
        if i >= self.n or of != self.n or m.group(4) != b"%.6f" % loss_value(wid, i):
            return False
        self.tally.add((wid, 0), i)
        return True

    def bad(self, text: bytes, why: str = "") -> None:
        self.torn += 1
        if len(self.examples) < 3:
            self.examples.append((why + ": " if why else "") + repr(text[:160].decode("utf-8", "replace")))

    def summary(self) -> Dict[str, Any]:
        expected = self.procs * self.n
        found = sum(self.tally.present_below((wid, 0), self.n) for wid in range(self.procs))
        return {"expected": expected, "found": found, "lost": expected - found, "dup": self.tally.dups,
                "torn": self.torn, "warmup_lines": self.warmup, "notices": len(self.notices),
                "notice_texts": self.notices[:5], "bad_examples": self.examples}


def verify_lines(path: str, procs: int, n: int, logger_name: Optional[str]) -> Dict[str, Any]:
    """One line per record: stdlib FMT, or the same layout from loguru."""
    t = Findings(procs, n)
    want_logger = logger_name.encode() if logger_name else None
    if os.path.exists(path):
        for _lineno, line, complete in read_lines(path):
            if not complete:
                t.bad(line, "unterminated last line")
                continue
            m = LINE_RE.match(line)
            if not m:
                t.bad(line)
                continue
            if m["lvl"] != b"INFO" or (want_logger and m["lg"] != want_logger):
                t.bad(line, "level/logger")
                continue
            pn = m["pn"]
            if not t.body(m["body"], lambda wid: pn == worker_name(wid).encode()):
                t.bad(line)
    return t.summary()


def verify_mplog_full(path: str, procs: int, n: int, pids: Dict[int, int]) -> Tuple[Dict[str, Any], Set[bytes]]:
    """Blocks: header, '  Message: ...', separator. mplog's own notices (logger 'mplog') are
    set aside; returns the findings and the first lines of those notices."""
    t = Findings(procs, n)
    notice_firsts: Set[bytes] = set()
    if not os.path.exists(path):
        return t.summary(), notice_firsts
    for item in read_blocks(path):
        if isinstance(item[0], str):
            why, _lineno, line = item
            t.bad(line, why)
            continue
        header, body, _lineno = item
        if header["logger"] == b"mplog":
            text = body[0][len(MESSAGE):] if body and body[0].startswith(MESSAGE) else b""
            t.notices.append(text[:200].decode("utf-8", "replace"))
            notice_firsts.add(text)
            continue
        if len(body) != 1 or not body[0].startswith(MESSAGE):
            t.bad(b" | ".join([header.group(0)] + body), "block shape")
            continue
        if header["level"] != b"INFO" or header["logger"] != LOGGER_NAME.encode() or header["file"] != CALLER_FILE:
            t.bad(header.group(0), "header fields")
            continue
        pn, pid = header["process"], int(header["pid"])
        if not t.body(body[0][len(MESSAGE):],
                      lambda wid: pn == worker_name(wid).encode() and pids.get(wid) in (None, pid)):
            t.bad(b" | ".join([header.group(0)] + body), "message")
    return t.summary(), notice_firsts


def verify_mplog_simple(path: str, procs: int, n: int, notice_firsts: Set[bytes]) -> Dict[str, Any]:
    """One ``[time] message`` line per record; mplog's notices are those the full log holds."""
    t = Findings(procs, n)
    in_notice = False
    if os.path.exists(path):
        for _lineno, line, complete in read_lines(path):
            if not complete:
                t.bad(line, "unterminated last line")
                continue
            if line.startswith(b" "):  # continuation of a multi-line message
                if not in_notice:
                    t.bad(line, "stray continuation")
                continue
            m = SIMPLE_LINE.match(line)
            if not m:
                t.bad(line)
                in_notice = False
                continue
            msg = m.group(1)
            if t.body(msg):
                in_notice = False
                continue
            text = re.sub(rb"\A(?:WARNING|ERROR|CRITICAL): ", b"", msg)
            if text in notice_firsts:
                t.notices.append(text[:200].decode("utf-8", "replace"))
                in_notice = True
                continue
            t.bad(line)
            in_notice = False
    return t.summary()


def add_verifications(parts: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    total = {"lost": 0, "dup": 0, "torn": 0}
    for part in parts.values():
        for key in total:
            total[key] += part[key]
    total["files"] = parts
    return total
