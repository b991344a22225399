"""Room on the filesystems mplog writes its own files to, shared by every process.

A store into a page of a sparse file that tmpfs cannot back is a SIGBUS, not an error
(FIELD-NOTES, "Machines that are not a laptop"): every file mplog maps (the rings, the
counters) reserves its pages here before the first store into them. And what mplog removes
from a shared root (``/dev/shm``, ``/tmp``) it removes only if it is its own.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat

__all__ = ["reserve", "remove_own_dir"]

PAGE = mmap.PAGESIZE


def reserve(fd: int, offset: int, length: int) -> bool:
    """Make the filesystem back bytes [offset, offset + length) of ``fd`` now (posix_fallocate:
    ENOSPC here, not a SIGBUS at the store). False if it cannot."""
    if length <= 0:
        return True
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # macOS: no way to reserve; its disks do not fill page by page
        return True
    start = offset // PAGE * PAGE
    try:
        fallocate(fd, start, offset + length - start)
    except OSError as exc:
        if exc.errno == errno.EINTR:
            return reserve(fd, offset, length)
        return False  # ENOSPC, EDQUOT, or a filesystem that cannot: no room, never a guess
    return True


def remove_own_dir(path: str) -> None:
    """Remove the directory ``path`` and what it holds, if it is a directory of this user (not a
    link, not another user's made at a name we use)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        shutil.rmtree(path, ignore_errors=True)
