"""Syslog forwarding from the listener: RFC 5424 messages over TCP, RFC 6587 octet counting.

The listener hands every record it writes to :meth:`SyslogForwarder.submit`, which only checks
the level and appends the record to a bounded buffer: it never formats, never touches the
network, never blocks and never raises, so the log files cannot be slowed by a slow or dead
syslog host. A daemon thread formats the buffered records, sends them in batches, and
reconnects with an exponential backoff. Formatting there rather than in ``submit`` keeps the
listener's cost per record to a level check and a deque append (well under a microsecond),
and a record dropped while the syslog host is away never costs a format.

Accounting. Every record at or above ``level`` that ``submit`` accepts ends up in exactly one
of these counters (``state()``)::

    submitted = forwarded + dropped + lost + pending + in_flight

- ``forwarded``: the syslog host's TCP stack acknowledged every byte of the message. A message
  only handed to our kernel is ``in_flight``, not forwarded, until its last byte is acknowledged
  (read from the socket's unacknowledged byte count, ``SIOCOUTQ``).
- ``dropped``: never sent. The buffer was full and the *oldest* buffered record made room for
  the new one (the syslog host then gets the most recent records once it is back; the complete
  history is in the local files), or the record was still buffered when ``close()``'s time ran
  out, or it was submitted after ``close()``.
- ``lost``: handed to our kernel on a connection that broke before the peer acknowledged all of
  it (``SIOCOUTQ`` at the moment the break is detected tells how many trailing bytes were not
  acknowledged), or still unacknowledged when ``close()``'s time ran out (the socket is then
  reset, so the kernel cannot deliver it later).
- ``pending``: buffered, not yet handed to the kernel (a message the kernel did not take
  before a break stays here and goes first on the next connection: it cannot be a duplicate).

Who holds what: ``_Buffer`` the records not yet formatted, ``submitted`` and ``dropped``;
``_Sender`` (the thread) the formatted messages the kernel did not take (``pending`` is both)
and the end offsets of those ``in_flight``; ``_Connection`` settles them into ``_Tally``'s
``forwarded`` and ``lost``; ``SyslogForwarder`` is the façade the listener calls, and
``SyslogLink`` the listener's hold on it (its figures in the shared counters, for health).

Why count the in-flight messages as lost rather than resend them: RFC 6587 has no
application-level acknowledgement, so the only certainty a sender has is its own TCP state.
A message whose bytes the peer did not acknowledge may still have reached it (the ACK itself
may be what was lost, or the peer read part of a frame and logged it), so resending it can
duplicate it; a duplicated record is a lie the counters cannot show, a lost one is counted.

The limit of plain TCP syslog, which no sender can see: a receiver that closes a connection
while its socket still holds bytes it acknowledged but had not read resets the connection and
discards them, and those messages count as ``forwarded``. rsyslog does this on SIGTERM when
records are streaming in (it stops reading before it closes its sessions). ``resets`` counts
the connections that ended by a reset (or that we gave up on) rather than by the receiver's
clean close: only those can hide such a loss, and only for the messages sent last before the
break. A clean close (FIN) means the receiver read everything it acknowledged, and then the
counters are exact. RELP (application-level acknowledgements) is the protocol that closes
this gap; RFC 6587 cannot.

Nothing is ever unpickled, and nothing read from the network is interpreted: the socket is
read only to notice that the peer closed it, and whatever a peer sends is discarded.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from .._common.counters import Counters
from .._common.format import clean, clean_inline
from .._common.record import Record, make_record

__all__ = ["format_rfc5424", "SyslogForwarder", "severity", "SD_ID", "FACILITY_LOCAL0"]

SD_ID = "mplog@32473"  # 32473: the enterprise number RFC 5612 reserves for documentation
FACILITY_LOCAL0 = 16
BOM = b"\xef\xbb\xbf"
_SIOCOUTQ = 0x5411  # termios.TIOCOUTQ: bytes in a TCP socket's send queue not yet acknowledged
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)
_FIXED_PARAMS = ("process", "file", "line")


def severity(levelno: int) -> int:
    """The syslog severity of a logging level (levels between the standard ones round down)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


# -- names ------------------------------------------------------------------------------------
_PRINTUSASCII = frozenset(range(33, 127))
_NAME_CACHE: Dict[Tuple[str, int, bool], str] = {}


def _sanitize(text: str, maxlen: int, sd_name: bool, empty: str) -> str:
    """PRINTUSASCII (33..126) only, at most ``maxlen``; other characters become ``_``. An
    SD-NAME also excludes ``=``, space, ``]`` and ``"``."""
    key = (text, maxlen, sd_name)
    cached = _NAME_CACHE.get(key)
    if cached is not None:
        return cached
    out = []
    for ch in str(text)[:maxlen]:
        code = ord(ch)
        if code not in _PRINTUSASCII or (sd_name and ch in '="]'):
            out.append("_")
        else:
            out.append(ch)
    result = "".join(out) or empty
    if len(_NAME_CACHE) > 4096:  # logger names and extra keys repeat; a flood of new ones must not grow it
        _NAME_CACHE.clear()
    _NAME_CACHE[key] = result
    return result


def _param_value(value: Any) -> str:
    """A PARAM-VALUE: one line (control characters, newlines, bidi and lone surrogates escaped as
    in the files), then ``\\``, ``"`` and ``]`` escaped with a backslash (RFC 5424 §6.3.3)."""
    text = value if type(value) is str else str(value)
    if not text.isprintable():
        text = clean_inline(text)
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if '"' in text:
        text = text.replace('"', '\\"')
    if "]" in text:
        text = text.replace("]", "\\]")
    return text


def _structured_data(rec: Record) -> str:
    parts = [f'[{SD_ID} process="{_param_value(rec.processName)}" file="{_param_value(rec.pathname)}" '
             f'line="{_param_value(rec.lineno)}"']
    if rec.extras:
        for key, value in rec.extras.items():
            name = _sanitize(key, 32, True, "_")
            if name in _FIXED_PARAMS:  # never shadow a fixed parameter (as the JSON format does)
                name = _sanitize("extra_" + name, 32, True, "_")
            parts.append(f' {name}="{_param_value(value)}"')
    parts.append("]")
    return "".join(parts)


# -- time -------------------------------------------------------------------------------------
class _Clock:
    """RFC 3339 local time with microseconds and the UTC offset; the second is cached."""

    def __init__(self) -> None:
        self._sec = None  # type: Optional[int]
        self._prefix = ""
        self._offset = ""

    def stamp(self, created: float) -> str:
        sec = int(created)
        if sec != self._sec:
            tm = time.localtime(sec)
            off = tm.tm_gmtoff or 0
            sign = "+" if off >= 0 else "-"
            off = abs(off) // 60
            # Set the pair before the second, so a racing thread never pairs a new second
            # with an old prefix (each format call reads the three fields once each).
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", tm)
            self._offset = f"{sign}{off // 60:02d}:{off % 60:02d}"
            self._sec = sec
            return f"{self._prefix}.{int((created - sec) * 1_000_000):06d}{self._offset}"
        return f"{self._prefix}.{int((created - sec) * 1_000_000):06d}{self._offset}"


_CLOCK = _Clock()


def format_rfc5424(rec: Record, hostname: str, app_name: str, facility: int, *, framed: bool = True,
                   clock: Optional[_Clock] = None) -> bytes:
    """One record as an RFC 5424 message, framed by RFC 6587 octet counting (``framed=False``:
    the bare message).

    ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [mplog@32473 process=.. file=.. line=..
    extra=..] BOM MSG``: PRI from the facility and the level, MSGID the logger name, the
    traceback and stack (if any) appended to the message on their own lines. The message keeps
    its newlines; every other control character, bidi override or lone surrogate is escaped as
    in the log files, so a receiver that prints the message cannot be fooled by it.
    """
    pri = facility * 8 + severity(rec.levelno)
    stamp = (clock or _CLOCK).stamp(rec.created)
    host = _sanitize(hostname, 255, False, "-")
    app = _sanitize(app_name, 48, False, "-")
    procid = _sanitize(str(rec.process), 128, False, "-") if rec.process else "-"
    msgid = _sanitize(rec.name, 32, False, "-")
    msg = rec.msg if type(rec.msg) is str else str(rec.msg)
    if rec.exc_text:
        msg = f"{msg}\n{rec.exc_text}"
    if rec.stack_info:
        msg = f"{msg}\n{rec.stack_info}"
    if not msg.isprintable():
        msg = clean(msg, "")
    head = f"<{pri}>1 {stamp} {host} {app} {procid} {msgid} {_structured_data(rec)} "
    data = head.encode("utf-8", "backslashreplace") + BOM + msg.encode("utf-8", "backslashreplace")
    if framed:
        return b"%d " % len(data) + data
    return data


# -- the forwarder ----------------------------------------------------------------------------
def _unacked(sock: socket.socket) -> Optional[int]:
    """Bytes of the socket's send queue the peer has not acknowledged (None if unknown).
    Linux keeps the sequence numbers after a reset, so this still answers on a broken socket."""
    try:
        buf = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])
    except (OSError, ValueError):
        return None


class _Closed(Exception):
    """The connection ended (the message says how); ``clean``: the receiver closed it cleanly."""

    def __init__(self, message: str, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean


class _Buffer:
    """The bounded buffer between the listener and the sender thread, the counters of what it
    accepted and dropped, and the pipe that wakes the thread.

    ``put`` runs in the listener's thread, ``take`` and ``drop_rest`` in the sender's; a record
    leaves the deque by one atomic ``popleft``, so it is counted once, by whichever took it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.records: Deque[Record] = collections.deque()
        # Each counter has one writer: the caller of put() or the sender thread.
        self.submitted = 0       # put(): accepted (at or above level)
        self.dropped_full = 0    # put(): oldest record pushed out, or submitted after close
        self.dropped_close = 0   # thread: still buffered when close()'s time ran out
        self.closed = False      # thread: it ended; what comes now is dropped
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def __len__(self) -> int:
        return len(self.records)

    def put(self, rec: Record) -> None:
        """Append ``rec``, pushing out the oldest when full. O(1); never blocks."""
        buf = self.records
        self.submitted += 1
        if self.closed:
            self.dropped_full += 1
            return
        if len(buf) >= self.size:
            try:
                buf.popleft()  # atomic: a record is taken either here or by the thread
                self.dropped_full += 1
            except IndexError:
                pass
        if buf:
            buf.append(rec)
        else:
            buf.append(rec)
            self.wake()  # only when the buffer goes from empty to not empty

    def take(self) -> Optional[Record]:
        try:
            return self.records.popleft()
        except IndexError:
            return None

    def drop_rest(self, carried: int) -> None:
        """The thread ends: what is left (and the ``carried`` messages it held) was not sent."""
        self.closed = True
        left = carried
        while self.take() is not None:
            left += 1
        self.dropped_close += left

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass  # the pipe is full: the thread is awake anyway

    def drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass

    def close_pipe(self) -> None:
        # Closed by close(), not by the thread: put() runs in the caller's thread, and must
        # never write into a descriptor number that something else has reused.
        if self.wake_w >= 0:
            wake_r, wake_w = self.wake_r, self.wake_w
            self.wake_r = self.wake_w = -1
            os.close(wake_r)
            os.close(wake_w)


class _Stop:
    """close()'s request, which the thread and the connection read: whether, and by when."""

    def __init__(self) -> None:
        self.requested = False
        self.deadline = 0.0

    def request(self, timeout: float) -> None:
        self.deadline = time.monotonic() + max(0.0, timeout)
        self.requested = True

    def expired(self, now: float) -> bool:
        return self.requested and now >= self.deadline


class _Tally:
    """The sender thread's counters and its latest error (it is their only writer)."""

    def __init__(self) -> None:
        self.forwarded = 0
        self.lost = 0
        self.reconnects = 0
        self.resets = 0  # connections that ended other than by the receiver's clean close
        self.connected = False
        self.last_error: Optional[str] = None  # the latest error, kept after a recovery
        self.last_error_time: Optional[float] = None  # when (time.time())

    def set_error(self, text: str) -> None:
        self.last_error_time = time.time()
        self.last_error = text


class _Connection:
    """One TCP connection and its acknowledgement tracking: which messages the kernel took
    (``inflight``: their end offsets), which the peer acknowledged (``SIOCOUTQ``: forwarded),
    and which a break leaves unacknowledged (lost)."""

    def __init__(self, sock: socket.socket, peer: str, tally: _Tally, inflight: Deque[int],
                 stop: _Stop, send_timeout: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setblocking(False)  # sends wait in poll(), so close() and breaks are noticed
        self.sock = sock
        self.peer = peer
        self.tally = tally
        self.inflight = inflight
        self.inflight.clear()
        self.sent = 0  # bytes the kernel took on this connection
        self.stop = stop
        self.send_timeout = send_timeout

    def check_peer(self) -> None:
        """Notice a closed or reset connection before sending more into it (the sooner, the
        fewer messages are lost). A syslog receiver sends nothing; anything it does send is
        discarded unread."""
        for _ in range(16):  # a peer that keeps talking cannot keep us here
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise _Closed(f"{self.peer} closed the connection", clean=True)

    def settle(self) -> None:
        """Messages whose last byte the peer acknowledged are forwarded."""
        if not self.inflight:
            return
        unacked = _unacked(self.sock)
        if unacked is None:
            return
        acked = self.sent - unacked
        inflight = self.inflight
        n = 0
        while inflight and inflight[0] <= acked:
            inflight.popleft()
            n += 1
        if n:
            self.tally.forwarded += n

    def broken(self) -> None:
        """The connection is gone (or given up): acknowledged messages are forwarded, the rest
        lost; the socket will be reset on close, so our kernel cannot deliver them later."""
        self.settle()  # if SIOCOUTQ cannot answer, every unconfirmed message counts lost
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        n = len(self.inflight)
        self.inflight.clear()
        if n:
            self.tally.lost += n
        self.tally.connected = False

    def send_batch(self, batch: List[bytes], size: int, carry: Deque[bytes]) -> None:
        """Hand ``batch`` to the kernel; what it did not take goes back to the front of ``carry``."""
        sock = self.sock
        data = memoryview(b"".join(batch))
        done = 0
        stalled_since = time.monotonic()
        try:
            while done < size:
                try:
                    n = sock.send(data[done:])
                except (BlockingIOError, InterruptedError):
                    n = 0
                if n:
                    done += n
                    stalled_since = time.monotonic()
                    continue
                # The send queue is full: wait for room, the peer's close, or close().
                now = time.monotonic()
                if now - stalled_since >= self.send_timeout:
                    raise _Closed(f"{self.peer} accepted nothing for {self.send_timeout:g} s")
                if self.stop.expired(now):
                    raise _Closed("closing: time ran out")
                self.check_peer()
                self.settle()
                poller = select.poll()
                poller.register(sock, select.POLLOUT | _POLLRDHUP)
                poller.poll(50)
        finally:
            self._account(batch, done, carry)

    def _account(self, batch: List[bytes], done: int, carry: Deque[bytes]) -> None:
        # Messages the kernel took whole are in flight; one it took in part is in flight
        # too (its frame is torn if the connection breaks: lost, never resent); the rest
        # never left this process and go first on the next connection.
        end = 0
        base = self.sent
        for i, msg in enumerate(batch):
            start = end
            end += len(msg)
            if start < done:
                self.inflight.append(base + end)
            else:
                carry.extendleft(reversed(batch[i:]))
                break
        self.sent = base + done


class _Sender:
    """The daemon thread: connects with an exponential backoff, formats the buffered records
    and sends them in batches, and settles each connection's accounting when it ends."""

    def __init__(self, buffer: _Buffer, tally: _Tally, stop: _Stop, *, host: str, port: int,
                 hostname: str, app_name: str, facility: int, backoff_initial: float,
                 backoff_max: float, send_timeout: float, connect_timeout: float,
                 batch_bytes: int) -> None:
        self.buffer = buffer
        self.tally = tally
        self.stop = stop
        self.host = host
        self.port = port
        self.hostname = hostname
        self.app_name = app_name
        self.facility = facility
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.send_timeout = send_timeout
        self.connect_timeout = connect_timeout
        self.batch_bytes = batch_bytes
        self.clock = _Clock()
        self.carry: Deque[bytes] = collections.deque()  # formatted, not taken by the kernel
        self.inflight: Deque[int] = collections.deque()  # end offsets of messages in the kernel
        self.thread = threading.Thread(target=self._run, name="mplog-syslog", daemon=True)
        self.thread.start()

    @property
    def pending(self) -> int:
        return len(self.buffer) + len(self.carry)

    def _sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``, or until close() is called (and its deadline has come)."""
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if self.stop.requested:
                end = min(end, self.stop.deadline)
            if now >= end:
                return
            poller = select.poll()
            poller.register(self.buffer.wake_r, select.POLLIN)
            poller.poll(max(1, int((end - now) * 1000)))
            self.buffer.drain_wake()

    def _run(self) -> None:
        delay = self.backoff_initial
        first = True
        stop, tally = self.stop, self.tally
        try:
            while True:
                if stop.requested and (time.monotonic() >= stop.deadline or not self.pending):
                    return
                timeout = self.connect_timeout
                if stop.requested:
                    timeout = max(0.01, min(timeout, stop.deadline - time.monotonic()))
                try:
                    sock = socket.create_connection((self.host, self.port), timeout=timeout)
                except OSError as exc:
                    tally.set_error(f"connect to {self.host}:{self.port}: {_describe(exc)}")
                    self._sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                if not first:
                    tally.reconnects += 1
                first = False
                forwarded_before = tally.forwarded
                try:
                    self._serve(sock)
                finally:
                    tally.connected = False
                    sock.close()
                if tally.forwarded > forwarded_before:
                    delay = self.backoff_initial  # the connection worked: start the backoff over
                elif not stop.requested:
                    self._sleep(delay)  # accepted, then broke without delivering: back off
                    delay = min(delay * 2, self.backoff_max)
        except Exception as exc:  # noqa: BLE001 - a bug here must show in health, not vanish
            tally.set_error(f"forwarder stopped: {type(exc).__name__}: {exc}")
        finally:
            self._finish()

    def _finish(self) -> None:
        """The thread ends: whatever is left was not sent."""
        carried = len(self.carry)
        self.carry.clear()
        self.buffer.drop_rest(carried)

    def _serve(self, sock: socket.socket) -> None:
        """Send on one connection until it breaks or close() ends it; settle its accounting."""
        conn = _Connection(sock, f"{self.host}:{self.port}", self.tally, self.inflight, self.stop,
                           self.send_timeout)
        self.tally.connected = True
        poller = select.poll()
        poller.register(sock, select.POLLIN | _POLLRDHUP)
        poller.register(self.buffer.wake_r, select.POLLIN)
        try:
            while True:
                conn.check_peer()
                conn.settle()
                if self.stop.requested:
                    if time.monotonic() >= self.stop.deadline:
                        break
                    if not self.pending:
                        if not self.inflight:
                            break
                        self._wait(poller, 10)  # for the last ACKs
                        continue
                if self.pending:
                    batch, size = self._take_batch()
                    conn.send_batch(batch, size, self.carry)
                    continue
                # Idle: wait for records or the peer's close; look at the ACKs while some are due.
                self._wait(poller, 20 if self.inflight else 1000)
        except _Closed as exc:
            self.tally.set_error(str(exc))
            if not exc.clean:
                self.tally.resets += 1
            conn.broken()
            return
        except OSError as exc:  # ECONNRESET, EPIPE, ...
            self.tally.set_error(f"send to {self.host}:{self.port}: {_describe(exc)}")
            self.tally.resets += 1
            conn.broken()
            return
        self._end(conn)

    def _end(self, conn: _Connection) -> None:
        # close(): stop cleanly if everything was acknowledged; otherwise reset the connection
        # (in broken()), so that nothing counted lost can still be delivered by our kernel later.
        conn.settle()
        if self.inflight:
            self.tally.set_error(f"closing: {len(self.inflight)} message(s) not acknowledged in time")
            self.tally.resets += 1
            conn.broken()
        else:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _wait(self, poller: "select.poll", ms: int) -> None:
        for fd, _ev in poller.poll(ms):
            if fd == self.buffer.wake_r:
                self.buffer.drain_wake()

    def _take_batch(self) -> Tuple[List[bytes], int]:
        batch: List[bytes] = []
        size = 0
        carry = self.carry
        while carry and size < self.batch_bytes:
            msg = carry.popleft()
            batch.append(msg)
            size += len(msg)
        while size < self.batch_bytes:
            rec = self.buffer.take()
            if rec is None:
                break
            msg = self._format(rec)
            batch.append(msg)
            size += len(msg)
        return batch, size

    def _format(self, rec: Record) -> bytes:
        try:
            return format_rfc5424(rec, self.hostname, self.app_name, self.facility, clock=self.clock)
        except Exception as exc:  # noqa: BLE001 - a field of the wrong type costs its text, not the record
            try:
                what = f"{type(exc).__name__}: {exc}"
            except Exception:  # noqa: BLE001
                what = type(exc).__name__
            stand_in = make_record(time.time(), logging.ERROR, "mplog",
                                   f"<record could not be formatted for syslog: {what}>")
            return format_rfc5424(stand_in, self.hostname, self.app_name, self.facility, clock=self.clock)


def _counter(part: str, name: str, doc: str) -> Any:
    """A read-only attribute of the forwarder that one of its parts holds."""
    return property(lambda self: getattr(getattr(self, part), name), doc=doc)


class SyslogForwarder:
    """Forward records to a syslog engine over TCP; see the module's docstring for the counters.

    ``submit`` is what the listener calls for every record: O(1), never blocks, never raises.
    ``state()`` is JSON-serialisable, for health. ``close(timeout)`` flushes what it can
    within ``timeout`` seconds and stops the thread.

    ``level``: records below it are ignored. ``buffer_size``: records held while the syslog
    host is slow or away (the oldest is dropped, and counted, to make room). ``facility``:
    0..23 (16, local0). ``hostname``: the HOSTNAME field (default ``socket.gethostname()``).
    ``backoff_initial``/``backoff_max``: the reconnection delay, doubling. ``send_timeout``: a
    connection that accepts no byte for that long is given up (reset; its unacknowledged
    messages are lost) and a new one is made. ``batch_bytes``: bytes per ``send()``; also about
    the most a break can catch in flight. Sends are non-blocking ``send()`` calls waited on in
    ``poll()`` rather than ``sendall()``: a failed ``sendall()`` does not say how much of the
    batch the kernel took, and that decides which messages are in flight (lost on a break) and
    which never left (sent first on the next connection).
    """

    def __init__(self, host: str, port: int, *, level: int = logging.DEBUG, buffer_size: int = 10000,
                 facility: int = FACILITY_LOCAL0, app_name: str = "mplog", backoff_initial: float = 0.1,
                 backoff_max: float = 5.0, hostname: Optional[str] = None, send_timeout: float = 10.0,
                 connect_timeout: float = 5.0, batch_bytes: int = 16 * 1024) -> None:
        if not 0 <= facility <= 23:
            raise ValueError(f"syslog facility must be 0..23, not {facility!r}")
        if buffer_size < 1:
            raise ValueError(f"syslog buffer_size must be at least 1, not {buffer_size!r}")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("syslog backoff: need 0 < backoff_initial <= backoff_max")
        self.host = host
        self.port = int(port)
        self.level = int(level)
        self.buffer_size = int(buffer_size)
        self.facility = facility
        self.app_name = _sanitize(app_name, 48, False, "-")
        self.hostname = _sanitize(hostname or socket.gethostname(), 255, False, "-")
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.send_timeout = send_timeout
        self.connect_timeout = connect_timeout
        self.batch_bytes = batch_bytes
        self._buffer = _Buffer(self.buffer_size)
        self._tally = _Tally()
        self._stop = _Stop()
        self._sender = _Sender(self._buffer, self._tally, self._stop, host=self.host, port=self.port,
                               hostname=self.hostname, app_name=self.app_name, facility=facility,
                               backoff_initial=backoff_initial, backoff_max=backoff_max,
                               send_timeout=send_timeout, connect_timeout=connect_timeout,
                               batch_bytes=batch_bytes)

    submitted = _counter("_buffer", "submitted", "Records accepted (at or above the level).")
    forwarded = _counter("_tally", "forwarded", "Messages whose every byte the peer acknowledged.")
    lost = _counter("_tally", "lost", "Messages unacknowledged when their connection broke.")
    reconnects = _counter("_tally", "reconnects", "Connections made after the first.")
    resets = _counter("_tally", "resets", "Connections ended other than by the receiver's clean close.")
    connected = _counter("_tally", "connected", "A connection is up.")
    last_error = _counter("_tally", "last_error", "The latest error, kept after a recovery.")
    last_error_time = _counter("_tally", "last_error_time", "When the latest error happened (time.time()).")

    def submit(self, rec: Record) -> None:
        """Queue ``rec`` if it is at or above the level. O(1); never blocks, never raises."""
        try:
            if rec.levelno < self.level:
                return
            self._buffer.put(rec)
        except Exception:  # noqa: BLE001 - a record of the wrong shape must not hurt the listener
            pass

    @property
    def dropped(self) -> int:
        return self._buffer.dropped_full + self._buffer.dropped_close

    def state(self) -> Dict[str, Any]:
        """For health: JSON-serialisable."""
        tally = self._tally
        return {
            "host": self.host, "port": self.port, "connected": tally.connected,
            "submitted": self._buffer.submitted, "forwarded": tally.forwarded, "dropped": self.dropped,
            "lost": tally.lost, "pending": self._sender.pending,
            "in_flight": len(self._sender.inflight), "reconnects": tally.reconnects,
            "resets": tally.resets, "last_error": tally.last_error,
            "last_error_time": tally.last_error_time,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Send what can be sent within ``timeout`` seconds, then stop. What is still buffered
        then counts as dropped, what is unacknowledged as lost (the connection is reset, so the
        kernel cannot deliver it later)."""
        if not self._stop.requested:
            self._stop.request(timeout)
            self._buffer.wake()
        thread = self._sender.thread
        thread.join(max(0.0, self._stop.deadline - time.monotonic()) + 1.0)
        if not thread.is_alive():
            self._buffer.close_pipe()


class SyslogLink:
    """The listener's forwarder and its figures in the shared counters, for health.

    The counters are cumulative over listener restarts; a killed listener's buffered syslog
    messages are gone with it (its files' copy is not)."""

    KEYS = ("forwarded", "dropped", "lost", "reconnects", "resets")

    def __init__(self, address: Tuple[str, int], level: int, counters: Counters) -> None:
        host, port = address
        self.forwarder = SyslogForwarder(host, int(port), level=level)
        self.counters = counters
        self._base = {k: counters.get("syslog_" + k) for k in self.KEYS}

    def publish(self) -> None:
        c = self.counters
        st = self.forwarder.state()
        for key, base in self._base.items():
            c.set("syslog_" + key, base + st[key])
        c.set("syslog_connected", 1 if st["connected"] else 0)
        c.set("syslog_pending", st["pending"] + st["in_flight"])

    def close(self, timeout: float) -> None:
        """Forward what can be forwarded within ``timeout`` seconds, stop, publish the figures."""
        self.forwarder.close(timeout)
        self.publish()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return f"{type(exc).__name__}: {exc}"
