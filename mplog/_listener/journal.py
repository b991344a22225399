"""The batch journal: what makes "commit after write" exact across a SIGKILL of the listener.

A batch's life, in the shared counters and the rings' headers::

    announce   counters: written-so-far, both files' sizes before and after, their inodes;
               each ring in the batch: its tail and record count after the batch, tagged with
               the batch number; then ``pending`` = n (last: it makes the rest valid)
    write      both files, one ``write()`` each
    commit     each ring's tail moves (the producer may reuse the space); ``written`` += n;
               ``pending`` = 0

A listener that starts after a killed one settles the announced batch from the files: if the
full log reached the announced size, the batch is in the files, so the rings' tails move as the
dead listener meant them to; if not, the torn tail is cut off both files and the rings keep
their tails, so the same records are read and written again. Either way each record is in the
files exactly once. The files are found by inode, so a logrotate between the kill and the
restart does not confuse it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Optional, Tuple

from .._common.counters import S_SEEN, Counters

if TYPE_CHECKING:  # pragma: no cover
    from .files import FileSet, LogFile
    from .._common.spool import RingReader, Taken

__all__ = ["Journal"]


class Journal:
    """Announce, commit and settle batches of records for one spool's counters."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def announce(self, files: "FileSet", full_len: int, simp_len: int, n: int,
                 taken: Iterable[Tuple["RingReader", "Taken"]]) -> None:
        c = self.counters
        c.set("pending_base", c.get("written"))
        c.set("full_start", files.full.size)
        c.set("full_expected", files.full.size + full_len)
        c.set("simp_start", files.simple.size)
        c.set("simp_expected", files.simple.size + simp_len)
        c.set("full_ino", files.full.ident[1])
        c.set("simp_ino", files.simple.ident[1])
        batch = c.get("batch") + 1
        c.set("batch", batch)
        for ring, t in taken:
            ring.announce(batch, t.pos, t.done)
        c.set("pending", n)  # last: a non-zero pending means the fields above are valid

    def commit(self, n: int, taken: Iterable[Tuple["RingReader", "Taken"]], written: bool = True) -> None:
        """The batch is in the files (or, ``written`` False, was diverted and counted so)."""
        c = self.counters
        for ring, t in taken:
            ring.commit(t.pos, t.done)
            c.slot(ring.slot).set(S_SEEN, t.done)
            for path in t.externals:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if n and written:
            c.add("written", n)
        c.set("pending", 0)

    def settle(self, files: "FileSet", rings: Iterable["RingReader"]) -> int:
        """Settle the batch a killed listener announced. Returns the records it had written
        (now counted), 0 if there was none or it is to be written again."""
        c = self.counters
        pending = c.get("pending")
        if not pending:
            return 0
        done = 0
        if c.get("written") == c.get("pending_base"):  # it died before counting the batch
            full = _find_by_inode(files.full, c.get("full_ino"))
            simp = _find_by_inode(files.simple, c.get("simp_ino"))
            if full is not None and full[1] >= c.get("full_expected"):
                batch = c.get("batch")
                for ring in rings:
                    if ring.settle(batch):
                        c.slot(ring.slot).set(S_SEEN, ring.done)
                c.add("written", pending)
                done = pending
            else:
                # Cut a torn tail so the files hold only whole blocks; the rings still hold
                # the records, and they are written again.
                for found, start in ((full, c.get("full_start")), (simp, c.get("simp_start"))):
                    if found is not None and start < found[1]:
                        try:
                            os.truncate(found[0], start)
                        except OSError:
                            pass
                files.refresh_sizes()
        c.set("pending", 0)
        return done


def _find_by_inode(f: "LogFile", ino: int) -> Optional[Tuple[str, int]]:
    """(path, size) of the file with inode ``ino``: the current one, or a rotated copy."""
    if f.fd >= 0 and f.ident[1] == ino:
        return f.path, os.fstat(f.fd).st_size
    directory = os.path.dirname(f.path) or "."
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.inode() == ino and entry.is_file(follow_symlinks=False):
                    return entry.path, entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return None
