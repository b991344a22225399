"""Fair to every process (issue 30, item 5): one process's big records, or its death with
them still in its ring, do not hold the other processes' records back.

The listener is stopped (SIGSTOP) while a worker fills its ring with 1 MiB records and is
SIGKILLed, and another worker and the main process log small records; then it goes on
(SIGCONT). Before the fix the listener wrote the dead process's whole ring first, in one batch
(no byte limit per ring, and the end of a process pumped its ring alone): every small record
came after its last big one. Now each ring gives about 1 MB a pass, and the dead process's end
waits for its ring to drain in turn. The delays in seconds are measured by
``scripts/targets.py --only big-record-neighbour``, not here.
"""

from __future__ import annotations

import logging
import os
import re
import signal

import pytest

import workers
from conftest import app_blocks, read_blocks

from mplog._common.spool import TAKE_BUDGET, RingReader, open_ring_writer

BIG = 1024 * 1024  # a record of this many bytes is over the per-ring budget: one per pass
N_BIG = 12
N_SMALL = 55


@pytest.fixture
def spool_tmpfs(tmpfs, monkeypatch):
    """The spool on a private 200 MB tmpfs: big records never touch the shared /dev/shm."""
    root = tmpfs("spool", "200m")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root))
    return root


def test_killed_big_sender_does_not_hold_back_other_processes(service, ctx, spool_tmpfs):
    """After the SIGKILL of a process with twelve 1 MiB records in its ring, the small records of
    a live worker and of the main process are written before its last big record; its end is
    written after its records; every record once; the accounting exact."""
    svc = service(queue_size=64)
    go, sent = ctx.Event(), ctx.Event()
    big = ctx.Process(target=workers.big_sender, args=(svc.worker_config, N_BIG, BIG, go, sent))
    small = ctx.Process(target=workers.small_sender, args=(svc.worker_config, "small", N_SMALL, go))
    big.start()
    small.start()
    listener = 0
    try:
        # Both workers are watched (worker_init returned) and the listener is idle: stop it.
        assert svc.flush(30)
        listener = svc.health()["listener"]["pid"]
        os.kill(listener, signal.SIGSTOP)
        go.set()
        assert sent.wait(60)
        os.kill(big.pid, signal.SIGKILL)
        big.join(30)
        small.join(60)
        assert small.exitcode == 0
        workers.log_n(("main", N_SMALL))
    finally:
        if listener:
            os.kill(listener, signal.SIGCONT)
        go.set()
        for p in (big, small):
            if p.is_alive():
                p.kill()
            p.join(10)
    assert svc.flush(60)
    final = svc.stop()["records"]

    path = svc.full_path
    blocks = read_blocks(path)
    messages = [str(b["message"]) for b in blocks]
    big_at = [i for i, m in enumerate(messages) if m.startswith("big ")]
    small_at = [i for i, m in enumerate(messages) if re.match(r"^(small|main) item \d+$", m)]
    # Every record once.
    assert sorted(int(messages[i].split()[1]) for i in big_at) == list(range(N_BIG))
    assert sorted(messages[i] for i in small_at) == sorted(
        [f"small item {k}" for k in range(N_SMALL)] + [f"main item {k}" for k in range(N_SMALL)])
    # The point: the small records did not wait for the dead process's ring.
    assert max(small_at) < max(big_at), (max(small_at), max(big_at))
    # Its own order: its records, then the record of its end.
    ends = [i for i, b in enumerate(blocks) if b["logger"] == "mplog" and b["pid"] == big.pid
            and "SIGKILL" in str(b["message"])]
    assert len(ends) == 1 and ends[0] > max(big_at), (ends, max(big_at))
    assert len(app_blocks(path)) == N_BIG + 2 * N_SMALL
    assert final["written"] == N_BIG + 2 * N_SMALL
    assert final["dropped"] == final["lost"] == final["diverted"] == 0
    assert final["sent"] == final["written"]


@pytest.mark.parametrize("impl", ["compiled", "python"])
def test_ring_take_stops_at_its_byte_budget(tmp_path, monkeypatch, impl):
    """RingReader.take hands over about ``budget`` bytes (at least one record), inline records
    counted in ring bytes and big ones by their file's size, and says it cut the ring short."""
    if impl == "python":
        monkeypatch.setenv("MPLOG_PURE_PYTHON", "1")
    path = str(tmp_path / "ring.0")
    writer = open_ring_writer(path, 512 * 1024, 1000)
    reader = RingReader(path, 0)
    if impl == "compiled" and reader._take_entries is None:
        pytest.skip("the compiled module is not built")
    try:
        inline = [bytes([i]) * 10_000 for i in range(10)]  # 10,016 ring bytes each, with its header
        for p in inline:
            assert writer.write(p)
        t = reader.take(1000, budget=32 * 1024)
        assert t.payloads == inline[:4] and reader.cut  # 3 entries are under 32 KiB, the 4th passes it
        t = reader.take(1000, budget=1)
        assert t.payloads == inline[4:5] and reader.cut  # always at least one record
        t = reader.take(1000)
        assert t.payloads == inline[5:] and not reader.cut  # what is left is under the default
        reader.commit(t.pos, t.done)

        big = [bytes([i]) * (TAKE_BUDGET // 2 + 1) for i in range(5)]  # files of their own
        assert len(big[0]) > writer.inline_max
        for p in big:
            assert writer.write(p)
        t = reader.take(1000)
        assert t.payloads == big[:2] and len(t.externals) == 2 and reader.cut
        t = reader.take(1000)
        assert t.payloads == big[2:4] and reader.cut
        t = reader.take(1000)
        assert t.payloads == big[4:] and not reader.cut
    finally:
        reader.close()
        writer.close()
