"""The frame codec: round trips, reassembly, torn streams, garbage; fuzzed with hypothesis.

The strategies below are the fuzz corpus: random payload sizes (one frame to many), random
read boundaries, random garbage injected between and inside frames.
"""

from __future__ import annotations

import logging
import os
import signal

from hypothesis import HealthCheck, given, settings, strategies as st

from mplog._common.transport import FRAME_MAX, K_RECORD, PAYLOAD_MAX, FrameParser, encode_frames
from conftest import app_blocks, read_blocks, wait_for


def _frames(pid, seq, payload, tid=1):
    return encode_frames(K_RECORD, pid, tid, seq, payload)


def test_frames_never_exceed_pipe_buf():
    for size in (0, 1, PAYLOAD_MAX, PAYLOAD_MAX + 1, 5 * PAYLOAD_MAX + 17):
        frames = _frames(1, 3, b"a" * size)
        assert all(len(f) <= FRAME_MAX for f in frames)
        assert len(frames) == max(1, -(-size // PAYLOAD_MAX))


def test_interleaved_chunked_streams_reassemble():
    a = _frames(10, 1, b"A" * (3 * PAYLOAD_MAX + 5))
    b = _frames(11, 1, b"B" * (2 * PAYLOAD_MAX + 9))
    c = _frames(10, 2, b"small", tid=2)
    mixed = [a[0], b[0], c[0], a[1], b[1], a[2], b[2], a[3]]
    out = FrameParser().feed(b"".join(mixed))
    assert [(m[1], m[4][:1], len(m[4])) for m in out] == [
        (10, b"s", 5), (11, b"B", 2 * PAYLOAD_MAX + 9), (10, b"A", 3 * PAYLOAD_MAX + 5)]


def test_record_logged_between_own_chunks_survives():
    """A signal handler can log a whole record between two chunks of its thread's record."""
    outer = _frames(5, 1, b"o" * (2 * PAYLOAD_MAX + 1))
    inner = _frames(5, 2, b"inner")
    p = FrameParser()
    out = p.feed(outer[0] + inner[0] + outer[1] + outer[2])
    assert [m[4][:5] for m in out] == [b"inner", b"ooooo"]
    assert p.torn == 0


def test_writer_killed_between_chunks_is_torn_once():
    p = FrameParser()
    big = _frames(5, 1, b"x" * (4 * PAYLOAD_MAX))
    after = _frames(6, 1, b"other writer")
    assert [m[4] for m in p.feed(b"".join(big[:2]) + after[0])] == [b"other writer"]
    assert p.expire(lambda pid: pid != 5) == 1  # pid 5 is gone
    assert p.torn == 1
    assert p.feed(b"".join(big[2:])) == []  # late chunks of the torn record: dropped, not recounted
    assert p.torn == 1


def test_continuation_without_start_counts_one_torn_record():
    """The start of a record died with a killed listener: the rest is one torn record."""
    big = _frames(7, 9, b"y" * (5 * PAYLOAD_MAX))
    p = FrameParser()
    out = p.feed(b"".join(big[2:]) + _frames(7, 10, b"next")[0])
    assert [m[4] for m in out] == [b"next"]
    assert p.torn == 1


def test_tail_of_a_frame_is_skipped_and_counted():
    """A killed listener consumed the head of a frame: the next one resynchronises."""
    f1 = _frames(1, 1, b"first" * 50)[0]
    f2 = _frames(1, 2, b"second")[0]
    p = FrameParser()
    out = p.feed(f1[37:] + f2)
    assert [m[4] for m in out] == [b"second"]
    assert p.malformed == 1 and p.skipped_bytes == len(f1) - 37


def test_corrupted_payload_fails_crc():
    f = bytearray(_frames(1, 1, b"payload!")[0])
    f[-1] ^= 0xFF
    p = FrameParser()
    assert p.feed(bytes(f) + _frames(1, 2, b"ok")[0])[0][4] == b"ok"
    assert p.malformed == 1


payloads = st.lists(st.binary(min_size=0, max_size=3 * PAYLOAD_MAX), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.lists(st.integers(min_value=1, max_value=3 * FRAME_MAX), max_size=20))
def test_fuzz_any_read_boundaries_give_the_same_messages(messages, cuts):
    stream = b"".join(b"".join(_frames(100 + i, i, m)) for i, m in enumerate(messages))
    p = FrameParser()
    out = []
    pos = 0
    for c in cuts:
        out += p.feed(stream[pos:pos + c])
        pos += c
    out += p.feed(stream[pos:])
    assert [m[4] for m in out] == messages
    assert p.malformed == 0 and p.torn == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.lists(st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=64)), max_size=6))
def test_fuzz_garbage_never_crashes_or_desynchronises(messages, garbage):
    """Garbage inserted anywhere costs at most the frames it lands in: every frame whose bytes
    are intact is still decoded, nothing invented."""
    frames = [f for i, m in enumerate(messages) for f in _frames(100 + i, i, m)]
    spots = {}
    for where, junk in garbage:
        spots.setdefault(where % (len(frames) + 1), b"")
        spots[where % (len(frames) + 1)] += junk
    stream = b""
    for i, f in enumerate(frames):
        stream += spots.get(i, b"") + f
    stream += spots.get(len(frames), b"")
    p = FrameParser()
    out = p.feed(stream)
    p.close()
    got = [m[4] for m in out]
    # Garbage lies only *between* frames here, so every message must come through whole.
    assert got == messages
    assert all(isinstance(m, tuple) and len(m) == 5 for m in out)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20000))
def test_fuzz_random_bytes(data):
    """Random bytes never crash the parser, and whatever it returns is a whole, known frame."""
    from mplog._common.transport import _KINDS
    p = FrameParser()
    out = p.feed(data)
    p.close()
    assert all(kind in _KINDS and len(payload) <= PAYLOAD_MAX for kind, _pid, _tid, _seq, payload in out)
    assert p.skipped_bytes <= len(data) and (p.malformed > 0) == (p.skipped_bytes > 0)


def test_buggy_writer_garbage_in_the_live_fifo(service):
    """Bytes that are no frame, written into the real control FIFO by a buggy writer, are
    skipped and counted; a well-formed frame of a record kind is no control message and is
    ignored (records travel in the spool). Records before and after arrive intact."""
    svc = service()
    log = logging.getLogger("fifo")
    log.info("before garbage")
    assert svc.flush(10)
    fd = os.open(svc.worker_config.fifo_path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"\xd3\x6c this is not a frame \x00\xff" * 20)
        os.write(fd, _frames(os.getpid(), 1, b"\x00garbled marshal")[0])
    finally:
        os.close(fd)
    log.info("after garbage")
    assert svc.flush(10)
    assert [b["message"] for b in read_blocks(svc.full_path)] == ["before garbage", "after garbage"]
    assert svc.health()["records"]["malformed_frames"] >= 1


def _foreign_ring(svc):
    """A ring in the service's spool written by this test, as a buggy (same-user) process
    would: its records go through the listener's checks like anyone's."""
    from mplog._common.counters import S_RING, Counters
    from mplog._common.spool import RingWriter
    spool = svc.health()["queue"]["spool"]
    counters = Counters.open(os.path.join(spool, "counters"))
    slot = counters.claim_slot(os.getpid())
    ring = RingWriter(os.path.join(spool, f"ring.{slot.index}"), 65536, 100)
    slot.set(S_RING, 1)
    return ring


def test_undecodable_and_malformed_records_become_placeholders(service):
    """A record that is not marshal data, and one that claims to be a formatted record but is
    not one of ours: each becomes one counted placeholder; nothing of them reaches the file."""
    svc = service()
    ring = _foreign_ring(svc)
    assert ring.write(b"\x00garbled marshal")
    from mplog._common.record import encode_formatted
    assert ring.write(encode_formatted(20, False, "no header\n[2026-01-01] fake\n", None, None))
    logging.getLogger("fifo").info("after")
    assert svc.flush(10)
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["after"]
    notes = [b["message"] for b in read_blocks(svc.full_path) if b["logger"] == "mplog"]
    assert len(notes) == 2 and notes[0].startswith("<undecodable record from pid ")
    assert notes[1] == "<malformed pre-formatted record>"
    assert "fake" not in svc.full_path.read_text()
    assert svc.health()["records"]["replaced"] == 2


def test_a_record_that_fails_its_check_is_counted_and_never_written(service):
    """A ring entry whose bytes changed after it was published (a stray store, or a store not
    yet visible on a weakly ordered CPU): the listener waits, then counts it and skips to the
    next record it can trust; the damaged text never reaches the file."""
    from mplog._common.spool import ENTRY_SIZE, RING_HEADER
    from mplog._common.record import common_payload

    svc = service()
    ring = _foreign_ring(svc)
    payload = common_payload(logging.LogRecord("foreign", logging.INFO, __file__, 1, "SECRET-%s", ("DAMAGED",), None))
    os.kill(svc.health()["listener"]["pid"], signal.SIGSTOP)  # so it cannot read it before we damage it
    try:
        assert ring.write(payload)
        ring._mm[RING_HEADER + ENTRY_SIZE + 5] ^= 0xFF  # one flipped byte: the CRC no longer matches
    finally:
        os.kill(svc.health()["listener"]["pid"], signal.SIGCONT)
    logging.getLogger("fifo").info("after")
    wait_for(lambda: svc.health()["records"]["torn"] == 1, what="the damaged record counted")
    assert svc.flush(10)
    assert "SECRET-DAMAGED" not in svc.full_path.read_text()
    assert [b["message"] for b in app_blocks(svc.full_path)] == ["after"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_decoding_a_formatted_record_raises_only_value_error(tail):
    """Whatever bytes follow the formatted-record tag, decoding gives a record or ValueError
    (the listener turns the latter into a counted placeholder), never anything else."""
    from mplog._common.record import Formatted, deserialize
    try:
        rec = deserialize(b"\x02" + tail)
    except ValueError:
        return
    assert isinstance(rec, Formatted) and isinstance(rec.full, bytes)


def test_formatted_record_round_trip():
    from mplog._common.record import decode_formatted, encode_formatted
    payload = encode_formatted(30, True, "[x] full é\n" + "-" * 72 + "\n", "[x] simple\n", "careful")
    rec = decode_formatted(payload)
    assert (rec.levelno, rec.user, rec.full.decode(), rec.simple, rec.warning) == (
        30, True, "[x] full é\n" + "-" * 72 + "\n", b"[x] simple\n", "careful")
    assert decode_formatted(encode_formatted(10, False, "[y]\n", None, None)).simple is None
