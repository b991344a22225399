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

from ._format import clean, clean_inline
from ._record import Record, make_record

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
        self._clock = _Clock()
        self._buf: Deque[Record] = collections.deque()
        # Each counter has one writer: the caller of submit() or the sender thread.
        self.submitted = 0       # submit(): accepted (at or above level)
        self._dropped_full = 0   # submit(): oldest record pushed out, or submitted after close
        self._dropped_close = 0  # thread: still buffered when close()'s time ran out
        self.forwarded = 0       # thread
        self.lost = 0            # thread
        self.reconnects = 0      # thread
        self.resets = 0          # thread: connections that ended other than by the receiver's clean close
        self.connected = False   # thread
        self.last_error: Optional[str] = None  # thread: the latest error, kept after a recovery
        self.last_error_time: Optional[float] = None  # thread: when (time.time())
        self._carry: Deque[bytes] = collections.deque()  # formatted, not taken by the kernel
        self._inflight: Deque[int] = collections.deque()  # end offsets of messages in the kernel
        self._sent = 0  # bytes the kernel took on the current connection
        self._closing = False
        self._deadline = 0.0
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="mplog-syslog", daemon=True)
        self._thread.start()

    # -- the listener's side ---------------------------------------------------------------
    def submit(self, rec: Record) -> None:
        """Queue ``rec`` if it is at or above the level. O(1); never blocks, never raises."""
        try:
            if rec.levelno < self.level:
                return
            buf = self._buf
            self.submitted += 1
            if self._closed:
                self._dropped_full += 1
                return
            if len(buf) >= self.buffer_size:
                try:
                    buf.popleft()  # atomic: a record is taken either here or by the thread
                    self._dropped_full += 1
                except IndexError:
                    pass
            if buf:
                buf.append(rec)
            else:
                buf.append(rec)
                try:  # wake the thread only when the buffer goes from empty to not empty
                    os.write(self._wake_w, b"!")
                except OSError:
                    pass  # the pipe is full: the thread is awake anyway
        except Exception:  # noqa: BLE001 - a record of the wrong shape must not hurt the listener
            pass

    @property
    def dropped(self) -> int:
        return self._dropped_full + self._dropped_close

    def state(self) -> Dict[str, Any]:
        """For health: JSON-serialisable."""
        return {
            "host": self.host, "port": self.port, "connected": self.connected,
            "submitted": self.submitted, "forwarded": self.forwarded, "dropped": self.dropped,
            "lost": self.lost, "pending": len(self._buf) + len(self._carry),
            "in_flight": len(self._inflight), "reconnects": self.reconnects, "resets": self.resets,
            "last_error": self.last_error, "last_error_time": self.last_error_time,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Send what can be sent within ``timeout`` seconds, then stop. What is still buffered
        then counts as dropped, what is unacknowledged as lost (the connection is reset, so the
        kernel cannot deliver it later)."""
        if not self._closing:
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._closing = True
            self._wake()
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)
        if not self._thread.is_alive() and self._wake_w >= 0:
            # Closed here, not in the thread: submit() runs in the caller's thread, and must
            # never write into a descriptor number that something else has reused.
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            os.close(wake_r)
            os.close(wake_w)

    # -- the thread -----------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``, or until close() is called (and its deadline has come)."""
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if self._closing:
                end = min(end, self._deadline)
            if now >= end:
                return
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            poller.poll(max(1, int((end - now) * 1000)))
            self._drain_wake()

    def _run(self) -> None:
        delay = self.backoff_initial
        first = True
        try:
            while True:
                if self._closing and (time.monotonic() >= self._deadline
                                      or not (self._buf or self._carry)):
                    return
                timeout = self.connect_timeout
                if self._closing:
                    timeout = max(0.01, min(timeout, self._deadline - time.monotonic()))
                try:
                    sock = socket.create_connection((self.host, self.port), timeout=timeout)
                except OSError as exc:
                    self._set_error(f"connect to {self.host}:{self.port}: {_describe(exc)}")
                    self._sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                if not first:
                    self.reconnects += 1
                first = False
                forwarded_before = self.forwarded
                try:
                    self._serve(sock)
                finally:
                    self.connected = False
                    sock.close()
                if self.forwarded > forwarded_before:
                    delay = self.backoff_initial  # the connection worked: start the backoff over
                elif not self._closing:
                    self._sleep(delay)  # accepted, then broke without delivering: back off
                    delay = min(delay * 2, self.backoff_max)
        except Exception as exc:  # noqa: BLE001 - a bug here must show in health, not vanish
            self._set_error(f"forwarder stopped: {type(exc).__name__}: {exc}")
        finally:
            self._finish()

    def _set_error(self, text: str) -> None:
        self.last_error_time = time.time()
        self.last_error = text

    def _finish(self) -> None:
        """The thread ends: whatever is left was not sent."""
        self._closed = True
        left = len(self._carry)
        self._carry.clear()
        while True:
            try:
                self._buf.popleft()
            except IndexError:
                break
            left += 1
        self._dropped_close += left

    def _serve(self, sock: socket.socket) -> None:
        """Send on one connection until it breaks or close() ends it; settle its accounting."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setblocking(False)  # sends wait in poll(), so close() and breaks are noticed
        self._sent = 0
        self._inflight.clear()
        self.connected = True
        poller = select.poll()
        poller.register(sock, select.POLLIN | _POLLRDHUP)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                self._check_peer(sock)
                self._settle(sock)
                if self._closing:
                    if time.monotonic() >= self._deadline:
                        break
                    if not (self._buf or self._carry):
                        if not self._inflight:
                            break
                        self._wait(poller, 10)  # for the last ACKs
                        continue
                if self._carry or self._buf:
                    self._send_batch(sock)
                    continue
                # Idle: wait for records or the peer's close; look at the ACKs while some are due.
                self._wait(poller, 20 if self._inflight else 1000)
        except _Closed as exc:
            self._set_error(str(exc))
            if not exc.clean:
                self.resets += 1
            self._broken(sock)
            return
        except OSError as exc:  # ECONNRESET, EPIPE, ...
            self._set_error(f"send to {self.host}:{self.port}: {_describe(exc)}")
            self.resets += 1
            self._broken(sock)
            return
        # close(): stop cleanly if everything was acknowledged; otherwise reset the connection
        # (in _broken), so that nothing counted lost can still be delivered by our kernel later.
        self._settle(sock)
        if self._inflight:
            self._set_error(f"closing: {len(self._inflight)} message(s) not acknowledged in time")
            self.resets += 1
            self._broken(sock)
        else:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _wait(self, poller: "select.poll", ms: int) -> None:
        for fd, _ev in poller.poll(ms):
            if fd == self._wake_r:
                self._drain_wake()

    def _check_peer(self, sock: socket.socket) -> None:
        """Notice a closed or reset connection before sending more into it (the sooner, the
        fewer messages are lost). A syslog receiver sends nothing; anything it does send is
        discarded unread."""
        for _ in range(16):  # a peer that keeps talking cannot keep us here
            try:
                data = sock.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise _Closed(f"{self.host}:{self.port} closed the connection", clean=True)

    def _settle(self, sock: socket.socket) -> None:
        """Messages whose last byte the peer acknowledged are forwarded."""
        if not self._inflight:
            return
        unacked = _unacked(sock)
        if unacked is None:
            return
        acked = self._sent - unacked
        inflight = self._inflight
        n = 0
        while inflight and inflight[0] <= acked:
            inflight.popleft()
            n += 1
        if n:
            self.forwarded += n

    def _broken(self, sock: socket.socket) -> None:
        """The connection is gone (or given up): acknowledged messages are forwarded, the rest
        lost; the socket will be reset on close, so our kernel cannot deliver them later."""
        self._settle(sock)  # if SIOCOUTQ cannot answer, every unconfirmed message counts lost
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        n = len(self._inflight)
        self._inflight.clear()
        if n:
            self.lost += n
        self.connected = False

    def _take_batch(self) -> Tuple[List[bytes], int]:
        batch: List[bytes] = []
        size = 0
        carry = self._carry
        while carry and size < self.batch_bytes:
            msg = carry.popleft()
            batch.append(msg)
            size += len(msg)
        buf = self._buf
        while size < self.batch_bytes:
            try:
                rec = buf.popleft()
            except IndexError:
                break
            msg = self._format(rec)
            batch.append(msg)
            size += len(msg)
        return batch, size

    def _format(self, rec: Record) -> bytes:
        try:
            return format_rfc5424(rec, self.hostname, self.app_name, self.facility, clock=self._clock)
        except Exception as exc:  # noqa: BLE001 - a field of the wrong type costs its text, not the record
            try:
                what = f"{type(exc).__name__}: {exc}"
            except Exception:  # noqa: BLE001
                what = type(exc).__name__
            stand_in = make_record(time.time(), logging.ERROR, "mplog",
                                   f"<record could not be formatted for syslog: {what}>")
            return format_rfc5424(stand_in, self.hostname, self.app_name, self.facility, clock=self._clock)

    def _send_batch(self, sock: socket.socket) -> None:
        batch, size = self._take_batch()
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
                    raise _Closed(f"{self.host}:{self.port} accepted nothing for {self.send_timeout:g} s")
                if self._closing and now >= self._deadline:
                    raise _Closed("closing: time ran out")
                self._check_peer(sock)
                self._settle(sock)
                poller = select.poll()
                poller.register(sock, select.POLLOUT | _POLLRDHUP)
                poller.poll(50)
        finally:
            # Messages the kernel took whole are in flight; one it took in part is in flight
            # too (its frame is torn if the connection breaks: lost, never resent); the rest
            # never left this process and go first on the next connection.
            end = 0
            base = self._sent
            for i, msg in enumerate(batch):
                start = end
                end += len(msg)
                if start < done:
                    self._inflight.append(base + end)
                else:
                    self._carry.extendleft(reversed(batch[i:]))
                    break
            self._sent = base + done


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return f"{type(exc).__name__}: {exc}"
