"""Log files as the listener holds them: append-only, reopened when moved, rotated, compressed.

Only the listener process uses this module. Because it is the single writer, rotation needs no
lock between processes: it closes the file, renames it, opens a new one, and never writes the
rotated one again. Compression runs in a thread, on files no one writes any more, so it never
stalls writing.
"""

from __future__ import annotations

import gzip
import os
import queue
import re
import shutil
import stat
import threading
import time
from typing import Iterator, List, Optional

__all__ = ["FileSet", "LogFile", "Compressor", "rotated_files"]

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


class Compressor:
    """gzip rotated files in a background thread of the listener."""

    def __init__(self) -> None:
        self._q: "queue.Queue[Optional[str]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mplog-gzip", daemon=True)
        self._thread.start()

    def submit(self, path: str) -> None:
        self._q.put(path)

    def _run(self) -> None:
        while True:
            path = self._q.get()
            if path is None:
                return
            tmp = path + ".gz.part"
            try:
                with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                shutil.copymode(path, tmp)
                os.replace(tmp, path + ".gz")
                os.unlink(path)
            except OSError as exc:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                try:
                    os.write(2, f"mplog: could not compress {path}: {exc}\n".encode())
                except OSError:
                    pass

    def close(self, timeout: float) -> None:
        self._q.put(None)
        self._thread.join(timeout)


def rotated_files(path: str) -> List[str]:
    """Rotated copies of ``path`` (``path.YYYYmmdd-HHMMSS[-N][.gz]``), oldest first."""
    directory, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.(\d{8}-\d{6})(?:-(\d+))?(?:\.gz)?$")
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    seen = {}
    for name in names:
        m = pattern.match(name)
        if m:
            # While a copy is being compressed, both X and X.gz exist: one rotated copy, not two.
            key = (m.group(1), int(m.group(2) or 0))
            if key not in seen or name.endswith(".gz"):
                seen[key] = os.path.join(directory, name)
    return [seen[k] for k in sorted(seen)]


def _stamp_and_number(path: str, copy: str) -> "tuple[str, int]":
    m = re.match(re.escape(os.path.basename(path)) + r"\.(\d{8}-\d{6})(?:-(\d+))?(?:\.gz)?$", os.path.basename(copy))
    return (m.group(1), int(m.group(2) or 0)) if m else ("", -1)


class LogFile:
    """One log file: an append-only fd, its tracked size, and the identity of what it opened."""

    def __init__(self, path: str, mode: Optional[int] = None, follow: bool = False) -> None:
        self.path = path
        self.flags = _OPEN_FLAGS & ~getattr(os, "O_NOFOLLOW", 0) if follow else _OPEN_FLAGS
        self.mode = 0o666 if mode is None else mode  # 0o666 & ~umask, like open()
        self.fd = -1
        self.size = 0
        self.ident = (0, 0)
        self.opened_at = time.time()

    def open(self) -> None:
        """Open for append (creating it). O_NOFOLLOW unless the directory is private: a symlink
        planted at the path is refused."""
        fd = os.open(self.path, self.flags, self.mode)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(21, "not a regular file", self.path)
            if self.mode != 0o666 and st.st_size == 0:
                os.fchmod(fd, self.mode)  # an explicit file_mode wins over the umask
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self.fd = fd
        self.size = st.st_size
        self.ident = (st.st_dev, st.st_ino)
        self.opened_at = time.time()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def write(self, data: bytes) -> None:
        """Write all of ``data``; on failure cut what part of it went in, so no half block stays."""
        if self.fd < 0:
            self.open()
        start = self.size
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError:
            try:
                if os.fstat(self.fd).st_size > start:
                    os.ftruncate(self.fd, start)
            except OSError:
                pass
            raise
        self.size = start + len(data)

    def moved(self) -> bool:
        """True if the path no longer names the file we hold (deleted, renamed, replaced)."""
        try:
            st = os.stat(self.path, follow_symlinks=self.flags == _OPEN_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self.ident

    def check_truncated(self) -> None:
        """copytruncate emptied the file under us: follow its size (O_APPEND writes at the end)."""
        if self.fd >= 0:
            try:
                size = os.fstat(self.fd).st_size
            except OSError:
                return
            if size < self.size:
                self.size = size

    def rotate(self, backup_count: int, compressor: Optional[Compressor]) -> None:
        """Rename the file away, open a fresh one, delete copies beyond ``backup_count``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        # Several rotations in one second: number them after the highest of that second still
        # there. Reusing a number freed by pruning would make the newest copy sort as the
        # oldest, and the next pruning delete it (a burst kept the wrong copies).
        taken = [n for s, n in (_stamp_and_number(self.path, p) for p in rotated_files(self.path)) if s == stamp]
        n = max(taken) + 1 if taken else 0
        target = f"{self.path}.{stamp}" if n == 0 else f"{self.path}.{stamp}-{n}"
        while os.path.exists(target) or os.path.exists(target + ".gz"):
            n += 1
            target = f"{self.path}.{stamp}-{n}"
        self.close()
        try:
            os.rename(self.path, target)
        except FileNotFoundError:
            target = ""
        self.open()
        old = [p for p in rotated_files(self.path) if p not in (target, target + ".gz")]
        # ``target`` counts as one of the kept copies.
        excess = len(old) + (1 if target else 0) - backup_count
        for path in old[:max(0, excess)]:
            for victim in (path, path[:-3] if path.endswith(".gz") else path + ".gz"):
                try:
                    os.unlink(victim)
                except OSError:
                    pass
        if target and compressor is not None:  # after pruning: the listing must not race the gzip
            compressor.submit(target)


class FileSet:
    """The two log files of a service and their policy: rotation by size or age, following
    logrotate (moved, deleted, truncated), reopening on request. The policy is fixed at
    construction, so the write path checks one number per file."""

    def __init__(self, simplified_path: str, full_path: str, mode: Optional[int] = None,
                 rotate_bytes: Optional[int] = None, rotate_interval: Optional[float] = None,
                 backup_count: int = 5, compress: bool = False, follow: bool = False) -> None:
        self.simple = LogFile(simplified_path, mode, follow)
        self.full = LogFile(full_path, mode, follow)
        self.rotate_bytes = rotate_bytes
        self.rotate_interval = rotate_interval
        self.backup_count = backup_count
        self.compressor = Compressor() if compress else None
        self.rotations = 0
        self.reopens = 0

    def __iter__(self) -> Iterator[LogFile]:
        return iter((self.simple, self.full))

    def open(self) -> List[str]:
        """Open both; return the errors (a failure degrades the service, it is not fatal)."""
        errors = []
        for f in self:
            try:
                f.open()
            except OSError as exc:
                errors.append(f"cannot open {f.path}: {exc.strerror or exc}")
        return errors

    def close(self) -> None:
        for f in self:
            f.close()
        if self.compressor is not None:
            self.compressor.close(5.0)

    def refresh_sizes(self) -> None:
        for f in self:
            if f.fd >= 0:
                f.size = os.fstat(f.fd).st_size

    def write(self, simple: bytes, full: bytes) -> List[str]:
        """Append one batch to both files; raises OSError. Returns rotation errors, if any."""
        if simple:
            self.simple.write(simple)
        self.full.write(full)
        if self.rotate_bytes is not None:
            return [e for e in (self._rotate(f) for f in self if f.size >= self.rotate_bytes) if e]
        return []

    def housekeeping(self, reopen: bool = False) -> List[str]:
        """Once a second: follow logrotate, rotate by age, retry files that failed to open."""
        errors = []
        for f in self:
            if f.fd < 0 or f.moved() or reopen:
                try:
                    f.open()
                    self.reopens += 1
                except OSError as exc:
                    f.close()
                    errors.append(f"cannot open {f.path}: {exc.strerror or exc}")
                continue
            f.check_truncated()
            due = ((self.rotate_bytes is not None and f.size >= self.rotate_bytes)
                   or (self.rotate_interval is not None and time.time() - f.opened_at >= self.rotate_interval))
            if due and f.size > 0:
                error = self._rotate(f)
                if error:
                    errors.append(error)
        return errors

    def _rotate(self, f: LogFile) -> Optional[str]:
        try:
            f.rotate(self.backup_count, self.compressor)
            self.rotations += 1
            return None
        except OSError as exc:
            return f"cannot rotate {f.path}: {exc.strerror or exc}"
