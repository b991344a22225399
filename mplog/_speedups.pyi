# Stub of the optional C module mplog/_speedups.c (see mplog/_spool.py for the Python reference).
from typing import Any, List, Tuple

class RingCore:
    _head: int
    _seq: int
    _limit: int
    _seq_limit: int
    capacity: int
    inline_max: int
    _header: int
    def write(self, payload: bytes, length_word: int = ...) -> bool: ...
    def _attach(self, mm: Any) -> None: ...
    def _detach(self) -> None: ...

def take_entries(mm: Any, header: int, capacity: int, pos: int, done: int, head: int, limit: int,
                 out: List[bytes]) -> Tuple[int, int]: ...
def adler32(data: Any) -> int: ...
