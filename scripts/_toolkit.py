"""What the maintainer's scripts share: which mplog they measure, how to read mplog's two log
files, and the few /proc readings they take of other processes (Linux).

``scripts/`` is on ``sys.path`` when a script runs, so a script imports this as ``_toolkit``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from typing import Dict, Iterator, List, Optional, Tuple, Union

# -- which mplog ---------------------------------------------------------------------------------


def mplog_source() -> str:
    """``0.1.0 from /path/mplog (git abc1234, clean)``: a measurement names what it measured."""
    try:
        import mplog
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return f"not importable: {exc}"
    pkg = os.path.dirname(os.path.abspath(mplog.__file__))
    text = f"{mplog.__version__} from {pkg}"
    try:
        root = subprocess.run(["git", "-C", pkg, "rev-parse", "--show-toplevel"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        if root:
            head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", pkg], capture_output=True,
                                   text=True, timeout=10).stdout.split("\n")
            changed = [line[3:] for line in dirty if line.strip()]
            text += f" (git {head}" + (f", uncommitted changes in {', '.join(changed)})" if changed else ", clean)")
    except (OSError, subprocess.SubprocessError):
        pass
    from mplog._common import compiled as _compiled
    text += "; compiled code (mplog._speedups)" if _compiled.enabled() else "; Python code only (no mplog._speedups)"
    return text + _bytecode_note(pkg)


def _bytecode_note(pkg: str) -> str:
    """Whether mplog's modules load from ``.pyc`` files. Without them (``PYTHONDONTWRITEBYTECODE``
    and no install step that compiled them) every import compiles, and the compiler's leftovers
    stay in the main process's heap: every forked worker's RSS carries them (~1.2 MB)."""
    import importlib.util
    sources = [os.path.join(d, f) for d, _dirs, files in os.walk(pkg) for f in files if f.endswith(".py")]
    missing = [f for f in sources if not os.path.exists(importlib.util.cache_from_source(f))]
    if not missing:
        return "; its .pyc files"
    return (f"; {len(missing)} of its {len(sources)} modules without .pyc files (imports compile; "
            f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})")


# -- mplog's log files ---------------------------------------------------------------------------
# The full log is blocks: a header line, indented "  Message: ..." lines (continuations indented
# further), then SEP. The simplified log is one "[time] message" line per record.
SEP = b"-" * 72
# "[time] [LEVEL] [logger] [process:pid] [file:line]".
HEADER = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[(?P<level>[A-Z]+|Level \d+)\] "
                    rb"\[(?P<logger>[^\]]*)\] \[(?P<process>[^\]]*):(?P<pid>\d+)\] "
                    rb"\[(?P<file>[^\]]*):(?P<line>\d+)\]$")
MESSAGE = b"  Message: "
SIMPLE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (.*)$", re.S)
# mplog's own notices (logger "mplog"). A listener killed before it wrote its restart notice
# leaves it to the next, marked late.
RESTART = re.compile(rb"^listener restarted after (\S+)(?: \(a late notice[^)]*\))?; (\d+) records lost$")
SUMMARY = re.compile(rb"^mplog stopped(?: \(([^)]*)\))?: (\d+) records written, (\d+) dropped, (\d+) lost")
APP_GONE = b"the application exited without stopping the log service"
# The record of a worker's abnormal end (issue 12): "<name> (pid N) was killed by SIGKILL after ..."
DEATH = re.compile(rb"^(?:(?:ERROR|WARNING|CRITICAL): )?\S+ \(pid (\d+)\) (?:was killed by|was stopped by|crashed with|"
                   rb"exited with|ended by) (\S+)")
# A worker killed while no listener ran (a killed listener being replaced): nobody could take its
# exit status (README, "Why did my worker die?").
UNSEEN = re.compile(rb"^(?:(?:ERROR|WARNING|CRITICAL): )?\S+ \(pid (\d+)\) ended before the listener could watch it")


def read_lines(path: str) -> Iterator[Tuple[int, bytes, bool]]:
    """(line number, line without its newline, whether it had one) of every line of ``path``,
    as raw bytes: no decoding, no newline translation, so nothing torn can pass for intact."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                yield lineno, raw[:-1], True
            else:
                yield lineno, raw, False


# What read_blocks yields: a well-formed block (its header, its indented lines, the line number
# of its header) or a stretch that is not one (why, line number, the line).
Block = Tuple["re.Match[bytes]", List[bytes], int]
Garbled = Tuple[str, int, bytes]


def read_blocks(path: str) -> Iterator[Union[Block, Garbled]]:
    """The blocks of a full log, each a ``Block``, and every stretch that is not part of one as
    a ``Garbled`` (tell them apart with ``isinstance(item[0], str)``). One garbled region counts
    once: after it the reader skips to the next line that is a header."""
    header: Optional["re.Match[bytes]"] = None
    body: List[bytes] = []
    start_line = 0
    resync = False
    for lineno, line, complete in read_lines(path):
        if not complete:
            yield "unterminated last line", lineno, line
            header = None
            break
        if header is None:
            m = HEADER.match(line)
            if m is None:
                if not resync:
                    yield "not a block header", lineno, line
                    resync = True
                continue
            resync = False
            header, body, start_line = m, [], lineno
        elif line == SEP:
            yield header, body, start_line
            header = None
        elif line.startswith(b"  "):
            body.append(line)
        else:
            yield "unindented line inside a block", lineno, line
            header = None
            resync = True
    if header is not None:
        yield "unterminated block", start_line, header.group(0)


class Tally:
    """How many times each (producer, gen, seq) was seen: one bytearray per (producer, gen)."""

    def __init__(self) -> None:
        self.counts: Dict[Tuple[int, int], bytearray] = {}
        self.records = 0
        self.dups = 0
        self.dup_examples: List[str] = []

    def add(self, key: Tuple[int, int], seq: int) -> None:
        arr = self.counts.get(key)
        if arr is None:
            arr = self.counts[key] = bytearray(max(1024, seq + 1))
        elif seq >= len(arr):
            arr.extend(bytes(max(seq + 1 - len(arr), len(arr))))
        if arr[seq]:
            self.dups += 1
            if len(self.dup_examples) < 5:
                self.dup_examples.append(f"w{key[0]}.{key[1]} seq {seq}")
        if arr[seq] < 255:
            arr[seq] += 1
        self.records += 1

    def present(self, key: Tuple[int, int]) -> Tuple[int, int]:
        """(distinct seqs present, highest seq present + 1)."""
        arr = self.counts.get(key)
        if arr is None:
            return 0, 0
        distinct = len(arr) - arr.count(0)
        top = len(arr.rstrip(b"\0"))
        return distinct, top

    def present_below(self, key: Tuple[int, int], count: int) -> int:
        """How many of seqs ``0 .. count-1`` are present."""
        arr = self.counts.get(key, bytearray())
        return count - arr[:count].count(0) - max(0, count - len(arr))

    def same_as(self, other: "Tally") -> bool:
        keys = set(self.counts) | set(other.counts)
        for k in keys:
            a = bytes(self.counts.get(k, b"")).rstrip(b"\0")
            b = bytes(other.counts.get(k, b"")).rstrip(b"\0")
            if a != b:
                return False
        return True


# -- checks and figures --------------------------------------------------------------------------
class Checks:
    """PASS/FAIL lines, printed together with a RESULT line."""

    def __init__(self) -> None:
        self.items: List[Tuple[bool, str]] = []

    def __call__(self, ok: object, text: str) -> None:
        self.items.append((bool(ok), text))

    def report(self, label: str = "RESULT") -> bool:
        """Print every check and the verdict; True if all passed."""
        print("checks:")
        for ok, text in self.items:
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")
        passed = all(ok for ok, _t in self.items)
        print(f"{label}: {'PASS' if passed else 'FAIL'} "
              f"({sum(ok for ok, _t in self.items)}/{len(self.items)} checks passed)")
        print("=" * 100, flush=True)
        return passed


def mb(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / 1048576:.1f} MB"


# -- other processes (/proc) ---------------------------------------------------------------------
RING_FILE = re.compile(r"ring\.\d+\Z")


def ring_fds(pid: Optional[int], spool: Optional[str]) -> Optional[int]:
    """How many of ``pid``'s descriptors are rings of ``spool`` (None if we cannot tell)."""
    if not pid or not spool:
        return None
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    spool = os.path.realpath(spool)
    n = 0
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if os.path.dirname(target) == spool and RING_FILE.match(os.path.basename(target)):
            n += 1
    return n


def proc_stat(pid: int) -> Optional[Tuple[str, int]]:
    """(state, pgid) of ``pid`` from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def proc_status(pid: object = "self", fields: Tuple[str, ...] = ("VmHWM", "RssAnon", "RssFile", "RssShmem")
                ) -> Dict[str, int]:
    """The ``kB`` lines ``fields`` of /proc/PID/status, in bytes; those it lacks (or all, if the
    process is gone) are missing."""
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def is_running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def group_members(pgid: int) -> List[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                out.append(int(name))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")[:100].strip()
    except OSError:
        return "?"


def kill(pid: Optional[int], sig: int = signal.SIGKILL, group: bool = False) -> None:
    """Signal a process (or a process group) that may be gone already."""
    if not pid:
        return
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except OSError:
        pass
