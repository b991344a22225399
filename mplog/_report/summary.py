"""Fold the blocks of a full log into aggregates whose size does not grow with the log.

Time is binned (the bin width doubles when there are too many bins); each process keeps its
first and last record, counts per level and a reservoir sample of its warning and error marks;
warnings and errors are grouped by template (numbers and quoted values masked: the full log
carries only the formatted message); deaths and mplog's own notices are kept whole, up to caps.
Whatever is capped is counted, so the page can say how much it does not show.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from .reader import Block

__all__ = ["Summary", "ProcessRow", "Group", "Death", "Mark", "template_of"]

MAX_BINS = 400
MARKS_PER_PROCESS = 200
MAX_BLOCK_CHARS = 2000
MAX_GROUPS = 2000
MAX_DEATHS = 500
MAX_PROCESSES = 20000
MAX_KEYS = 5000  # distinct loggers counted by name; beyond, "(other)"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MARKED = frozenset(("WARNING", "ERROR", "CRITICAL"))

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?(?:0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
_DEATH = re.compile(r"^(.*) \(pid (\d+)\) (was killed by \S+|crashed with \S+|exited with status -?\d+|"
                    r"was stopped by \S+|ended (?:before the listener could watch it, )?without a clean exit)")
_STOP = re.compile(r"^mplog (\w+): (\d+) records written, (\d+) dropped, (\d+) lost(?:, (\d+) sent to stderr)?")


def template_of(message: str) -> str:
    """``loss=0.25 at step 7`` and ``loss=1.5 at step 9`` are one group: ``loss=# at step #``."""
    return _NUMBER.sub("#", _QUOTED.sub("'…'", message))[:200]


def clip(text: str) -> str:
    return text if len(text) <= MAX_BLOCK_CHARS else text[:MAX_BLOCK_CHARS] + "\n  … (cut)"


@dataclass
class Mark:
    created: float
    level: str
    title: str  # header and message, for the tooltip
    block: str  # the block, clipped


@dataclass
class ProcessRow:
    process: str
    pid: int
    first: float
    last: float
    count: int = 0
    levels: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    marks: List[Mark] = field(default_factory=list)
    marked: int = 0  # warnings and errors seen (the marks are a sample of them)
    death: Optional["Death"] = None
    listener: bool = False


@dataclass
class Group:
    level: str
    logger: str
    template: str
    example: str
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    processes: Counter = field(default_factory=Counter)  # type: ignore[type-arg]


@dataclass
class Death:
    created: float
    process: str
    pid: int
    level: str
    how: str
    cause: str
    message: str
    block: str


class Summary:
    """Aggregates of one pass over the blocks (``add`` each, or ``feed`` an iterable)."""

    def __init__(self, seed: int = 0) -> None:
        self.records = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self.levels: Counter = Counter()  # type: ignore[type-arg]
        self.bin_width = 1.0
        self.bin_origin: Optional[float] = None
        self.bins: Dict[int, Counter] = {}  # type: ignore[type-arg]
        self.processes: Dict[Tuple[str, int], ProcessRow] = {}
        self.processes_over = 0
        self.loggers: Counter = Counter()  # type: ignore[type-arg]
        self.groups: Dict[Tuple[str, str, str], Group] = {}
        self.groups_over = 0
        self.deaths: List[Death] = []
        self.deaths_over = 0
        self.stops: List[Dict[str, object]] = []
        self.restarts: List[Tuple[float, str]] = []
        self._rng = random.Random(seed)

    def feed(self, blocks: Iterable[Block]) -> "Summary":
        for b in blocks:
            self.add(b)
        return self

    def add(self, b: Block) -> None:
        t = b.created
        level = b.level
        self.records += 1
        if self.first is None or t < self.first:
            self.first = t
        if self.last is None or t > self.last:
            self.last = t
        self.levels[level] += 1
        self._bin(t, level)
        if b.logger in self.loggers or len(self.loggers) < MAX_KEYS:
            self.loggers[b.logger] += 1
        else:
            self.loggers["(other)"] += 1
        row = self._row(b)
        if level in MARKED:
            self._group(b)
        if b.logger == "mplog":
            self._notice(b, row)
        if row is not None and level in MARKED:
            row.marked += 1
            if len(row.marks) < MARKS_PER_PROCESS:
                row.marks.append(self._mark(b))
            else:  # a reservoir: every warning of a storm has the same chance to be shown
                k = self._rng.randrange(row.marked)
                if k < MARKS_PER_PROCESS:
                    row.marks[k] = self._mark(b)

    # -- the steps ----------------------------------------------------------------------------
    def _bin(self, t: float, level: str) -> None:
        if self.bin_origin is None:
            self.bin_origin = float(int(t))
        if t < self.bin_origin:  # out of order (clock stepped back): count it in the first bin
            t = self.bin_origin
        key = int((t - self.bin_origin) / self.bin_width)
        c = self.bins.get(key)
        if c is None:
            if key >= MAX_BINS:
                self._widen(key)
                key = int((t - self.bin_origin) / self.bin_width)
            c = self.bins.setdefault(key, Counter())
        c[level] += 1

    def _widen(self, key: int) -> None:
        while key >= MAX_BINS:
            merged: Dict[int, Counter] = {}  # type: ignore[type-arg]
            for k, c in self.bins.items():
                merged.setdefault(k // 2, Counter()).update(c)
            self.bins = merged
            self.bin_width *= 2
            key //= 2

    def _row(self, b: Block) -> Optional[ProcessRow]:
        key = (b.process, b.pid)
        row = self.processes.get(key)
        if row is None:
            if len(self.processes) >= MAX_PROCESSES:
                self.processes_over += 1
                return None
            row = self.processes[key] = ProcessRow(b.process, b.pid, b.created, b.created,
                                                   listener=b.process.startswith("mplog-listener"))
        row.count += 1
        row.levels[b.level] += 1
        if b.created < row.first:
            row.first = b.created
        if b.created > row.last:
            row.last = b.created
        return row

    def _mark(self, b: Block) -> Mark:
        return Mark(b.created, b.level, f"{b.lines[0]}\n{b.message[:300]}", clip(b.text()))

    def _group(self, b: Block) -> None:
        tpl = template_of(b.message)
        key = (b.level, b.logger, tpl)
        g = self.groups.get(key)
        if g is None:
            if len(self.groups) >= MAX_GROUPS:
                self.groups_over += 1
                return
            g = self.groups[key] = Group(b.level, b.logger, tpl, b.message[:300], first=b.created)
        g.count += 1
        g.last = max(g.last, b.created)
        g.first = min(g.first, b.created)
        who = f"{b.process}:{b.pid}"
        if who in g.processes or len(g.processes) < 20:
            g.processes[who] += 1
        else:
            g.processes["(more)"] += 1

    def _notice(self, b: Block, row: Optional[ProcessRow]) -> None:
        msg = b.message
        m = _STOP.match(msg)
        if m:
            self.stops.append({"time": b.created, "how": m.group(1), "written": int(m.group(2)),
                               "dropped": int(m.group(3)), "lost": int(m.group(4)),
                               "diverted": int(m.group(5) or 0)})
            return
        if msg.startswith("listener restarted after"):
            self.restarts.append((b.created, msg[:300]))
            return
        m = _DEATH.match(msg)
        if m and b.where.startswith("<exit>") and b.level != "DEBUG":
            if len(self.deaths) >= MAX_DEATHS:
                self.deaths_over += 1
                return
            cause = next((ln.split(":", 1)[1].strip() for ln in b.lines if ln.startswith("    exit:")), "")
            death = Death(b.created, b.process, b.pid, b.level, m.group(3), cause, msg[:500], clip(b.text()))
            self.deaths.append(death)
            if row is not None:
                row.death = death

    # -- results ------------------------------------------------------------------------------
    def series(self) -> List[Tuple[float, Counter]]:  # type: ignore[type-arg]
        """(start time, counts per level) of every bin, empty ones included, in order."""
        if self.bin_origin is None or not self.bins:
            return []
        top = max(self.bins)
        return [(self.bin_origin + k * self.bin_width, self.bins.get(k, Counter())) for k in range(top + 1)]

    def top_processes(self, n: int = 20) -> List[ProcessRow]:
        return sorted(self.processes.values(), key=lambda r: -r.count)[:n]
