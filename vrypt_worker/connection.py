"""The connection core every transport shares: sending with back-pressure, lingering after the
final answer, closing, eviction, idleness and the timeouts that do not depend on the protocol.

Two connection classes stand on it:
- `plain.Connection`: HTTP/1 on a plain socket, the framer driven inline (the hot path);
- `transport.SessionConnection`: TLS, and cleartext HTTP/2 (h2c), with an I/O-free
  `PlaintextProtocol` (protocol.py) behind a session (tls.TLSSession, or a pass-through).
A next transport is one more thin class here: it supplies reading and the few hooks below.

What the worker asks of every connection class (its contract with worker.py):
- `due`: the tick the timer wheel (wheel.py) has it filed under; only the wheel writes it.
  `WorkerState.closed(conn)` takes it out of the wheel and the worker's set: every close calls it.
- `on_tick(keepalive, now) -> int | None`: from the sweep, only at the tick it is filed under:
  every timeout that may be due is checked (closing, or answering 408 / GOAWAY), and the tick at
  which it must be looked at next is returned (None once closed).
- `drain()`, `close_if_idle(spare_fresh)`: graceful shutdown.
- `evictable()`, `idleness()`: at the connection cap, idle keep-alive connections are closed
  least recently used first; `idleness` is a sortable key on one scale for every class.
- `close()`.

The timeouts, one model for every class (docs/reliability.md, "Timeouts"). `seen` is the tick of
the last read, or of the last answer bytes the kernel took (until the first read: -1 minus the
tick of the accept). A timeout of N seconds measured from the last use fires at the sweep of tick
seen + 1 + N, i.e. between N and N + 1 seconds after it; one measured from a known moment (a
head's first byte, an accept) fires at the first sweep at or after it.
- here, for every class: lingering after the final answer (LINGER_TICKS sweeps at most), and the
  send timeout (answers owed that the client does not take, `send_timeout` from the last
  progress);
- in `timers`, the hook each class supplies: what depends on what is in progress. The plain
  connection keeps HTTP/1's head, body and keep-alive timeouts itself (its framer is inline);
  a connection behind an I/O-free protocol keeps the handshake and keep-alive timeouts and asks
  the protocol for the rest (`PlaintextProtocol.tick` and `deadline`, protocol.py).
A class files itself earlier with `wheel.wake` when a timeout shorter than the one it is filed
under starts; one that cannot see that on its read path (a protocol began a head) is filed no
later than a head timeout ahead instead.
"""

from __future__ import annotations

import heapq
import socket
from collections.abc import Callable, Iterable
from typing import Any

from vrypt_worker.framing import FramingRules
from vrypt_worker.wheel import TimerWheel

READ, WRITE = 1, 2
RECV_SIZE = 65536
# A connection's reads start at this size: a bytes object of up to 512 bytes (33 of them its
# header) comes from CPython's small-object allocator, while a 64 KiB receive buffer goes through
# malloc and is shrunk with realloc on every read (about 500 more instructions per request,
# measured with callgrind). A read that fills it moves the connection to RECV_SIZE for good.
# Reads and writes stay socket.recv/socket.send (recvfrom/sendto): os.read/os.write on the
# descriptor parse their arguments for about 800 fewer user-space instructions per request, but
# the kernel's read/write path costs more than that on a socket (perf: +0.35 µs per read and
# +0.4 µs per write against recvfrom/sendto), so they lose overall. docs/performance.md.
FIRST_RECV_SIZE = 512 - 33
# A connection whose last answer said `close` is shut for writing and read until the peer closes,
# so that unread request bytes do not turn our close into a reset that destroys the answer: for
# at most this many sweeps.
LINGER_TICKS = 2
# Closed connections leave their stopped read watcher here for the next accepted one (its fd is
# set, no new object, and no fcntl: gevent checks a descriptor with F_GETFD when it makes a
# watcher); at most this many wait.
SPARE_READERS = 256
# At the connection cap or out of descriptors, idle keep-alive connections (least recently used
# first) are closed to make room, as nginx's ngx_drain_connections does: an eighth of them, at
# least one and at most this many.
_EVICT = 32
_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info


def never_received(sock: Any) -> bool:
    """The peer has sent nothing on this TCP connection yet (kernel's count, not ours)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES_RECEIVED + 8)
    except OSError:
        return False
    if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
        return False
    return int.from_bytes(info[_TCP_INFO_BYTES_RECEIVED:], "little") == 0


def evict(connections: Iterable[BaseConnection]) -> bool:
    """Close some idle keep-alive connections, least recently used first (at the sweep's
    one-second resolution), whatever their class. False when none is idle."""
    idle = [conn for conn in connections if conn.evictable()]
    if not idle:
        return False
    count = max(1, min(_EVICT, len(idle) // 8))
    for conn in heapq.nlargest(count, idle, key=lambda conn: conn.idleness()):
        conn.close()
    return True


class WorkerState:
    """What every connection of one worker shares with it, in one small object: the worker's
    rules, answers, loop and timer wheel, its timeouts and budgets, and the three things a
    connection tells it (closed, recycle, publish). Connections read nothing else of the worker.
    """

    __slots__ = (
        "accepted",
        "access_log",
        "body_timeout",
        "closed",
        "head_budget",
        "head_timeout",
        "held",
        "log",
        "loop",
        "max_requests",
        "publish",
        "recycle",
        "responses",
        "rules",
        "send_timeout",
        "spare_readers",
        "unread",
        "wheel",
    )

    def __init__(
        self,
        rules: FramingRules,
        responses: Any,
        loop: Any,
        log: Any,
        timeouts: dict[str, int],
        closed: Callable[[Any], None],
        recycle: Callable[[], None],
        publish: Callable[[], None],
    ) -> None:
        self.rules = rules
        self.responses = responses  # response.ResponseTable: `bytes_for`, the answers by kind
        self.loop = loop
        self.log = log
        self.wheel = TimerWheel()
        self.head_timeout = timeouts["VRYPT_HEAD_TIMEOUT"]  # a TLS handshake's bound too
        self.body_timeout = timeouts["VRYPT_BODY_TIMEOUT"]
        self.send_timeout = timeouts["VRYPT_SEND_TIMEOUT"]
        self.head_budget = timeouts["VRYPT_HEAD_BUFFER"]
        self.held = 0  # bytes of partial heads (and chunk lines) held by all connections
        self.accepted = 0  # connections accepted so far (their order, for eviction)
        # `seen` of a connection accepted since the last sweep and never read: -1 - tick, one int
        # object for all of them (updated by the sweep).
        self.unread = -1
        self.max_requests = 0  # set by the worker (max_requests plus jitter, from its counts)
        self.spare_readers: list[Any] = []
        self.access_log: Any = None  # access_lines.AccessLog where gunicorn's access log is on
        self.closed = closed
        self.recycle = recycle
        self.publish = publish

    def advance(self) -> set[Any]:
        """The worker's sweep: the next tick, and the connections filed under it."""
        due = self.wheel.advance()
        self.rules.tick = tick = self.wheel.tick
        self.unread = -1 - tick
        return due


class BaseConnection:
    """One client socket on the hub: the core every connection class shares (module docstring).
    Subclasses read (`on_readable`) and supply the hooks; the core writes, lingers, closes and
    keeps the transport's timeouts."""

    __slots__ = ("born", "due", "lingering", "pending", "reader", "seen", "sock", "state", "writer")

    def __init__(self, state: WorkerState, sock: Any) -> None:
        self.state = state
        self.sock = sock
        self.pending = b""  # answer bytes the kernel did not take yet
        self.writer: Any = None
        self.seen = state.unread
        self.born = state.accepted  # accept order: among equally idle ones, older goes first
        state.accepted += 1
        self.lingering = 0  # while lingering: the tick at which it closes anyway
        spare = state.spare_readers
        if spare:
            reader = spare.pop()
            reader.fd = sock.fileno()
        else:
            reader = state.loop.io(sock.fileno(), READ)
        self.reader = reader

    # hooks ----------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """Between requests: nothing partial, nothing in progress."""
        raise NotImplementedError

    def timers(self, keepalive: int, now: float, tick: int, seen: int) -> int | None:
        """The timeouts that depend on what is in progress (a head, a body, a handshake, an
        HTTP/2 stream) and keep-alive, once lingering and the send timeout are not in play:
        the tick at which the next falls due, or None once closed."""
        raise NotImplementedError

    def close_idle(self) -> None:
        """The keep-alive timeout (or a drain) closes this idle connection."""
        self.close()

    def release(self) -> None:
        """Closing: give back what the connection holds of the worker's budgets."""

    def refill(self) -> bool:
        """Our writes have all gone: queue what was held back (owed answers, flow control).
        False when the kernel stopped taking bytes again."""
        return True

    def resume(self) -> None:
        """Our writes have all gone and nothing more waits: read again, or finish."""
        raise NotImplementedError

    # writing --------------------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if self.pending:
            self.pending += payload
            return
        try:
            sent = self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent != len(payload):
            self.wait_writable(payload[sent:])

    def try_send(self, payload: bytes) -> None:
        """A last record (close_notify, an alert, a GOAWAY before the close): one try."""
        if payload and not self.pending:
            try:
                self.sock.send(payload)
            except OSError:
                pass

    def wait_writable(self, rest: bytes) -> None:
        # The peer reads slower than it sends: stop reading it until it has taken our answers,
        # so a client that pipelines without reading cannot grow our memory.
        self.pending = rest
        if self.reader is None:
            return
        state = self.state
        state.publish()  # a final (rejected?) answer may wait here
        state.wheel.wake(self, state.wheel.tick + 1 + state.send_timeout)
        self.reader.stop()
        if self.writer is None:
            self.writer = state.loop.io(self.sock.fileno(), WRITE)
        self.writer.start(self.on_writable)

    def on_writable(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if sent:
            self.seen = self.state.wheel.tick  # progress: the send timeout starts again
        self.pending = self.pending[sent:]
        if self.pending or not self.refill() or self.reader is None:
            return
        self.writer.stop()
        self.resume()

    # ending ---------------------------------------------------------------------------------------

    def linger(self, clean: bool, goodbye: bytes = b"") -> None:
        """After the final answer (and `goodbye`: TLS's close_notify): close; when bytes may still
        come (`clean` False: an error, requests after the last one), half-close first and read and
        drop them until the peer closes, for LINGER_TICKS sweeps at most."""
        if self.lingering or self.reader is None:
            return
        state = self.state
        # The answer that reaches max_requests always closes (FramingRules.open_until), so
        # recycling is checked here, off the keep-alive path.
        if state.rules.answered >= state.max_requests:
            state.recycle()
        state.publish()  # the final answer left: a rejection is counted now
        self.try_send(goodbye)
        if clean:
            # A 200 after which the client sent nothing: no unread byte can turn our close into
            # a reset that destroys the answer, so close now (as nginx does), without lingering.
            self.close()
            return
        wheel = state.wheel
        self.lingering = wheel.tick + LINGER_TICKS
        wheel.wake(self, self.lingering)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        if self.reader is not None:
            self.reader.stop()
            self.reader.start(self.on_discard)

    def on_discard(self) -> None:
        """Lingering after the final answer: read and drop until the peer closes."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()

    def close(self) -> None:
        reader = self.reader
        if reader is None:
            return
        self.reader = None
        state = self.state
        spare = state.spare_readers
        if len(spare) < SPARE_READERS:
            reader.stop()  # for the next connection: stopping drops its callback
            spare.append(reader)
        else:
            reader.close()
        self.release()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        try:
            self.sock.close()
        except OSError:
            pass
        state.closed(self)

    # the worker's sweep and eviction ------------------------------------------------------------

    def on_tick(self, keepalive: int, now: float) -> int | None:
        """From the worker's sweep, at the tick the connection is filed under: every timeout
        of the connection (module docstring). Returns the tick at which the next one falls due
        (None once closed)."""
        if self.reader is None:
            return None
        state = self.state
        tick = state.wheel.tick
        if self.lingering:
            if tick < self.lingering:
                return self.lingering
            self.close()
            return None
        seen = self.seen
        if seen < 0:  # never read: counted from the accept
            seen = -1 - seen
        if self.pending:  # answers owed that the client does not take: the send timeout
            due = seen + 1 + state.send_timeout
            if tick < due:
                return due
            self.close()
            return None
        return self.timers(keepalive, now, tick, seen)

    def evictable(self) -> bool:
        """An idle keep-alive connection: read from, nothing partial, nothing owed, not closing."""
        return (
            self.seen >= 0
            and self.reader is not None
            and not self.pending
            and not self.lingering
            and self.idle()
        )

    def idleness(self) -> tuple[int, int]:
        """Larger for connections used less recently: sweeps since their last use, then
        accepted earlier (a just-accepted client's request may not be read)."""
        return self.state.wheel.tick - self.seen, -self.born
