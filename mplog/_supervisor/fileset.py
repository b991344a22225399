"""The file set a service writes: its directory checked before anything starts, and its lock.

``check_directory`` raises ``OSError`` naming the path if the logs cannot live there;
``FileSetLock`` is the one-writer-per-file-set lock, ``<directory>/.<name>.lock``;
``private_directory`` says whether a symbolic link at a log path may be followed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Any

from .._app.handler import _service_read_fds
from .._common.config import ServiceConfig
from .._common.spool import spool_prefix

__all__ = ["FileSetLock", "check_directory", "file_set_key", "lock_path", "private_directory"]


def private_directory(directory: Path) -> bool:
    """True if only its owner (this user, or root) can create or rename files in it: then a
    symbolic link at a log path was put there by this user, and is followed like a FileHandler
    would. In a directory others can write (group or world, like /tmp), a link may be planted
    to make the listener write somewhere else, so links are refused there."""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return st.st_uid in (os.getuid(), 0) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def check_directory(directory: Path, files: Any) -> None:
    """Raise OSError naming the path if the logs cannot live there. Opens nothing."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno or errno.EACCES, f"cannot create the log directory: {exc.strerror}",
                      str(directory)) from None
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the log directory is not a directory", str(directory))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "the log directory is not writable", str(directory))
    for path in files:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            if not private_directory(directory):
                raise OSError(errno.ELOOP, "the log file is a symbolic link in a directory that others can write; "
                                           "refusing to follow it (it could have been planted)", str(path))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # a dangling link: the listener creates its target, as open() would
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "the log file exists and is not a regular file", str(path))
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "the log file is not writable", str(path))


def file_set_key(cfg: ServiceConfig) -> str:
    """What names a file set among spools and services: its directory and name."""
    return spool_prefix(str(cfg.directory), cfg.name)


def lock_path(cfg: ServiceConfig) -> Path:
    """The file set's lock file: ``<directory>/.<name>.lock``."""
    return cfg.directory / f".{cfg.name}.lock"


class FileSetLock:
    """One writer per file set: held from ``acquire()`` to ``release()``.

    The lock is a ``flock`` on ``.<name>.lock`` in the log directory, 0600, this user's: a file
    set is known by what it is (the same files through a symbolic link or a bind mount share
    one lock file; two filesystems mounted at one path in two mount namespaces have two), the
    kernel drops it when the holder dies, and no other user can open it to hold it. ``flock``
    belongs to the open file, not the process: a second service of this process on the same
    files is refused too. A forked child closes its copy (see _app.handler), so an orphaned
    worker never keeps the next run out. The file holds the holder's pid; release() removes it.
    """

    def __init__(self, cfg: ServiceConfig) -> None:
        self.config = cfg
        self.fd = -1

    def acquire(self) -> None:
        """Take the lock, or raise OSError naming the files and the holder."""
        cfg = self.config
        path = lock_path(cfg)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                st = os.fstat(fd)
                if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
                    raise PermissionError(errno.EPERM, f"the lock file of these log files belongs to uid {st.st_uid}, "
                                                       "who could hold it: remove it, or log to a directory only you "
                                                       "can write", str(path))
                if stat.S_IMODE(st.st_mode) != 0o600:
                    os.fchmod(fd, 0o600)  # nobody else may open it, even to read: flock needs no more
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    here = " (this process)" if holder == str(os.getpid()) else ""
                    raise OSError(errno.EBUSY, f"another mplog service (pid {holder}{here}) is writing these log "
                                               "files; stop it, choose another name, or use mplog.ServiceHandler to "
                                               "join it", str(cfg.simplified_path)) from None
                try:
                    now = os.lstat(path)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # its holder removed it as we opened it: take the new one
                    continue
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _service_read_fds[fd] = os.getpid()  # a forked child closes it
            self.fd = fd
            return

    def release(self) -> None:
        """Remove the lock file and let the lock go. Idempotent."""
        if self.fd < 0:
            return
        _service_read_fds.pop(self.fd, None)
        try:
            # Removed while held (a service waiting for it sees another inode and retries).
            path = lock_path(self.config)
            if (os.lstat(path).st_ino, os.lstat(path).st_dev) == (os.fstat(self.fd).st_ino,
                                                                  os.fstat(self.fd).st_dev):
                os.unlink(path)
        except OSError:
            pass
        try:
            os.close(self.fd)  # releases the lock
        except OSError:
            pass
        self.fd = -1


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").split()
    except OSError:
        return "?"
    return text[0] if text and text[0].isdigit() else "?"
