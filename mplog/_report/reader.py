"""Read a full log (``<name>.debug.log``) and its rotated copies as a stream of blocks.

The full format (mplog/_common/format.py, FullFormatter) writes one block per record: a header
line in column 0, indented body lines, then a separator of 72 dashes. Nothing a message brings
can start a line with ``[`` in column 0, so a header is unambiguous. The files are read oldest
first, one line at a time: memory does not grow with the log.
"""

from __future__ import annotations

import gzip
import os
import re
import time
import zlib
from dataclasses import dataclass
from typing import IO, Dict, Iterator, List, Optional

__all__ = ["Block", "LogReader", "ReportError", "log_files"]

SEPARATOR = "-" * 72
# [time] [LEVEL] [logger] [processName:pid] [file:line]; logger and process names may hold
# brackets, so the fields are found from the ends (the greedy groups backtrack).
HEADER = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3})\] \[([^\]]*)\] \[(.*)\] \[(.*):(-?\d+)\] \[(.*)\]$")
_NUMBERED = re.compile(r"\.(\d+)(\.gz)?$")
_TERMINATOR = "\n" + SEPARATOR + "\n"
CHUNK = 1 << 22
MAX_BLOCK = 1 << 24  # 16 MiB of text without a separator: not our format


class ReportError(Exception):
    """Input the report cannot read at all (no log, a line that is not mplog's full format)."""


@dataclass
class Block:
    """One record of the full log."""

    created: float
    level: str
    logger: str
    process: str
    pid: int
    where: str
    message: str  # the message's first line
    lines: List[str]  # the whole block, header first, without the separator
    source: str  # file:line of the header

    def text(self) -> str:
        return "\n".join(self.lines)

    def body(self) -> List[str]:
        return self.lines[1:]


def log_files(directory: str, name: str) -> List[str]:
    """The full log and its rotated copies, oldest first: mplog's timestamped copies
    (``name.debug.log.YYYYmmdd-HHMMSS[-N][.gz]``), then numbered ones (``.N[.gz]``, the highest
    the oldest, as logging.handlers writes them), then the live file."""
    from .._listener.files import rotated_files

    live = os.path.join(directory, f"{name}.debug.log")
    numbered: Dict[int, str] = {}
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise ReportError(f"cannot read the directory {directory}: {exc.strerror or exc}") from None
    prefix = f"{name}.debug.log."
    for entry in names:
        if entry.startswith(prefix):
            m = _NUMBERED.match(entry[len(prefix) - 1:])
            if m and (int(m.group(1)) not in numbered or entry.endswith(".gz")):
                numbered[int(m.group(1))] = os.path.join(directory, entry)
    files = list(rotated_files(live))
    files += [numbered[n] for n in sorted(numbered, reverse=True)]
    if os.path.exists(live):
        files.append(live)
    return files


class _Clock:
    """Header times are local wall-clock text; converting costs microseconds, so cache the second."""

    def __init__(self) -> None:
        self._text = ""
        self._sec = 0.0

    def seconds(self, text: str) -> float:
        if text != self._text:
            self._sec = time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))
            self._text = text
        return self._sec


class LogReader:
    """Blocks of the full log of ``name`` in ``directory``, oldest first.

    Problems that leave the rest readable (a corrupt compressed copy, a truncated last block)
    are collected in ``problems``; a line that is not the full format raises ReportError naming
    the file and line, since then nothing after it can be trusted to be parsed right.
    """

    def __init__(self, directory: str, name: str = "run") -> None:
        self.directory = directory
        self.name = name
        self.files = log_files(directory, name)
        if not self.files:
            raise ReportError(f"no full log in {directory}: expected {name}.debug.log "
                              f"(or its rotated copies); is --name right?")
        self.problems: List[str] = []
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Block]:
        for path in self.files:
            yield from self._read_file(path)

    def _open(self, path: str) -> IO[str]:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="\n")
        return open(path, "r", encoding="utf-8", errors="replace", newline="\n")

    def _read_file(self, path: str) -> Iterator[Block]:
        # The file is read in chunks and cut at the separators (str.split runs in C): a line loop
        # in Python reads about three times fewer records per second.
        clock = _Clock()
        short = os.path.basename(path)
        buf = ""
        lineno = 1  # the line number of buf's first line
        try:
            with self._open(path) as f:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        break
                    self.bytes_read += len(chunk)
                    parts = (buf + chunk).split(_TERMINATOR)
                    buf = parts.pop()
                    for text in parts:
                        block = self._parse(text, path, short, lineno, clock)
                        lineno += text.count("\n") + 2
                        if block is not None:
                            yield block
                    if len(buf) > MAX_BLOCK:
                        self._parse(buf, path, short, lineno, clock)  # raises on a foreign format
                        raise ReportError(f"{path}:{lineno}: a block longer than {MAX_BLOCK:,} characters "
                                          f"without a separator: not mplog's full format")
        except (OSError, EOFError, zlib.error) as exc:
            self.problems.append(f"{path}: unreadable after line {lineno} ({exc}); the rest of the "
                                 f"file is skipped, the other files are read")
            return
        tail = buf.rstrip("\n")
        if tail.endswith(SEPARATOR) and (tail == SEPARATOR or tail.endswith("\n" + SEPARATOR)):
            tail = tail[:-len(SEPARATOR)].rstrip("\n")  # the last separator without its newline
            complete = True
        else:
            complete = False
        block = self._parse(tail, path, short, lineno, clock) if tail.strip("\n") else None
        if block is not None:
            if not complete:
                self.problems.append(f"{path}:{block.source.rsplit(':', 1)[1]}: the last block has no "
                                     f"separator (truncated; a run still writing, or killed): used as it is")
            yield block

    def _parse(self, text: str, path: str, short: str, lineno: int, clock: "_Clock") -> Optional[Block]:
        """The block in ``text`` (its lines, without the separator), whose first line is ``lineno``."""
        if text.startswith("\n"):  # blank lines between blocks
            stripped = text.lstrip("\n")
            lineno += len(text) - len(stripped)
            text = stripped
            if not text:
                return None
        lines = text.split("\n")
        m = HEADER.match(lines[0])
        if m is None:
            raise ReportError(f"{path}:{lineno}: not a record header of mplog's full format: {lines[0][:120]!r} "
                              f"(a log written with a custom full_format cannot be reported)")
        if text.count("\n  ") != len(lines) - 1:  # one C count instead of a loop over the lines
            for j, line in enumerate(lines[1:], 1):
                if not line.startswith("  "):
                    raise ReportError(f"{path}:{lineno + j}: a line inside the block of {short}:{lineno} "
                                      f"is not indented: {line[:120]!r}")
        message = lines[1][11:] if len(lines) > 1 and lines[1].startswith("  Message: ") else ""
        stamp, ms, level, logger, process, pid, where = m.groups()
        return Block(clock.seconds(stamp) + int(ms) / 1000.0, level, logger, process, int(pid), where, message,
                     lines, f"{short}:{lineno}")
