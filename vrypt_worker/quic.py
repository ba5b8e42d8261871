"""HTTP/3's transport: UDP sockets on the worker's hub, around the I/O-free core (h3/).

For each UDP socket of the worker (http3.py: one per bind address in its listener slot) a read
watcher on the gevent hub (`loop.io(fd, READ)`) calls `QuicSocket.on_readable` directly in the
loop, with no greenlet: it reads every datagram queued (up to _BATCH), feeds each to the socket's
endpoint (h3/endpoint.py: connections keyed by connection ID), then sends what the endpoint has
to send, once for the whole batch.

Timers: QUIC's are milliseconds apart (acknowledgement delay, loss detection, pacing), finer than
the worker's one-second timer wheel (wheel.py), which sweeps TCP connections. So each socket keeps
one loop timer at the endpoint's earliest deadline (a heap across its connections); it is made
again only when the earliest deadline moves earlier, and a timer that fires before a deadline that
moved later just arms the next. QUIC's own timeouts (idle: gunicorn's keepalive; the handshake's)
are aioquic's, inside those deadlines; the wheel does not see QUIC connections.

The worker's gauges: every answer counts in `rules.answered` (the RPS gauge, published once per
loop iteration as for TCP, and max_requests: the worker recycles when the count reaches it). The
access log, when on, is told of each answer (`AccessLog.h3_answered`), with `HTTP/3.0`.
"""

from __future__ import annotations

import time
from typing import Any

from vrypt_worker.connection import READ, WorkerState
from vrypt_worker.h3.answers import H3Answers
from vrypt_worker.h3.endpoint import H3Endpoint
from vrypt_worker.http3 import Plan

# Datagrams read per readable event before the endpoint sends: a batch lets aioquic acknowledge
# several packets at once, and bounds how long one busy socket keeps the loop.
_BATCH = 64
_MAX_DATAGRAM = 65535
# A loop timer fires at its deadline plus this (seconds): libev counts from the time it cached at
# the start of the loop iteration, so a timer exactly at the deadline can fire a hair before it
# by time.monotonic(), and would only arm itself again.
_TIMER_SLACK = 0.0005
# Draining: a connection whose answers are not all acknowledged this long after its GOAWAY is
# closed anyway. Every request was answered when it arrived, so only the delivery of the last
# answers waits; and while a leaving worker reads its slot's socket, its successor reads it too,
# and each loses the datagrams the other reads (docs/http3.md): the overlap is kept this short.
_DRAIN_GRACE = 1.0


class QuicSocket:
    """One UDP socket of the worker and its QUIC connections."""

    __slots__ = ("armed", "drained", "endpoint", "grace", "reader", "sock", "state", "timer")

    def __init__(self, state: WorkerState, sock: Any, endpoint: H3Endpoint) -> None:
        self.state = state
        self.drained: Any = None  # draining: called once no connection is left
        self.grace: Any = None
        self.sock = sock
        self.endpoint = endpoint
        self.timer: Any = None
        self.armed: float | None = None
        self.reader = state.loop.io(sock.fileno(), READ)
        self.reader.start(self.on_readable)

    def on_readable(self) -> None:
        sock = self.sock
        endpoint = self.endpoint
        now = time.monotonic()
        for _ in range(_BATCH):
            try:
                data, addr = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # (an ICMP error queued on the socket: nothing to read now)
            try:
                endpoint.feed(data, addr, now)
            except Exception:
                # A bug costs one datagram (its connection's timers recover or end it), never
                # the worker.
                self.state.log.exception("HTTP/3: a datagram from %s failed", addr)
        self.flush(now)

    def on_timer(self) -> None:
        self.timer.close()
        self.timer = None
        self.armed = None
        now = time.monotonic()
        try:
            self.endpoint.expire(now)
        except Exception:
            self.state.log.exception("HTTP/3: a connection's timer failed")
        self.flush(now)

    def flush(self, now: float) -> None:
        sock = self.sock
        try:
            out = self.endpoint.flush(now)
        except Exception:
            self.state.log.exception("HTTP/3: sending failed")
            out = []
        for data, addr in out:
            try:
                sock.sendto(data, addr)
            except OSError:
                pass  # a full send buffer or an unreachable peer: QUIC's recovery resends
        state = self.state
        if state.rules.answered >= state.max_requests:
            state.recycle()
        if self.drained is not None and self.reader.active and not self.endpoint.busy():
            # Every connection has had its CONNECTION_CLOSE: stop reading, so that a successor
            # reading the slot's socket gets every datagram from now on (the closing period
            # needs none of them), and let the worker go.
            self.reader.stop()
            self.drained()
        self.arm(now)

    def arm(self, now: float) -> None:
        deadline = self.endpoint.next_deadline()
        if deadline is None or (self.armed is not None and self.armed <= deadline):
            return  # nothing due, or the armed timer fires first (and arms the next)
        if self.timer is not None:
            self.timer.close()
        self.timer = self.state.loop.timer(max(deadline - now, 0.0) + _TIMER_SLACK)
        self.armed = deadline
        self.timer.start(self.on_timer)

    def drain(self, drained: Any) -> None:
        """The worker drains: no new connection; GOAWAY on the open ones, each closed once its
        answers are acknowledged; `drained()` once none is left."""
        self.drained = drained
        self.endpoint.drain()
        self.flush(time.monotonic())
        if self.reader.active:
            self.grace = self.state.loop.timer(_DRAIN_GRACE)
            self.grace.start(self.on_grace_over)

    def on_grace_over(self) -> None:
        self.grace.close()
        self.grace = None
        if self.reader.active:
            self.endpoint.close_all("draining")
            self.flush(time.monotonic())

    def close(self, close_socket: bool = True) -> None:
        """The worker exits (or gives back an adopted slot): every connection gets
        CONNECTION_CLOSE, then the socket's copy closes (the arbiter's stays, for the slot's
        next worker); an adopted slot's copy stays open, to be adopted again."""
        try:
            self.endpoint.close_all("server exiting")
            for data, addr in self.endpoint.flush(time.monotonic()):
                try:
                    self.sock.sendto(data, addr)
                except OSError:
                    pass
        except Exception:
            self.state.log.exception("HTTP/3: closing failed")
        self.reader.close()
        if self.grace is not None:
            self.grace.close()
            self.grace = None
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        if close_socket:
            try:
                self.sock.close()
            except OSError:
                pass


class QuicService:
    """A worker's HTTP/3: its UDP sockets, one answer for all of them; and the sockets of a
    listener slot it adopts while nobody serves it (listeners.py: TTOU, a worker gone and not
    replaced yet), whose connection IDs then carry that slot."""

    def __init__(
        self,
        state: WorkerState,
        plan: Plan,
        sockets: list[Any],
        access_log: Any = None,
        cid_prefix: bytes = b"",
        max_connections: int = 1 << 30,
    ) -> None:
        self.state = state
        self.plan = plan
        self.max_connections = max_connections
        self.answers = H3Answers(time.time())
        self.reporter: Any = None
        if access_log is not None:
            answers = self.answers

            def reporter(session: Any, fields: list[tuple[bytes, bytes]], head: bool) -> None:
                access_log.h3_answered(session.peer, fields, head, answers)

            self.reporter = reporter
        self.sockets = [self._socket(sock, cid_prefix) for sock in sockets]
        self.adopted: dict[int, list[QuicSocket]] = {}

    def _socket(self, sock: Any, cid_prefix: bytes) -> QuicSocket:
        endpoint = H3Endpoint(
            self.plan.configuration,
            self.answers,
            self.state.rules,
            self.reporter,
            cid_prefix,
            self.max_connections,
        )
        return QuicSocket(self.state, sock, endpoint)

    def _all(self) -> list[QuicSocket]:
        return [*self.sockets, *(sock for socks in self.adopted.values() for sock in socks)]

    def adopt(self, slot: int, sockets: list[Any], cid_prefix: bytes) -> None:
        """Read `slot`'s UDP sockets too, until `release(slot)`."""
        if slot not in self.adopted and sockets:
            self.adopted[slot] = [self._socket(sock, cid_prefix) for sock in sockets]

    def release(self, slot: int) -> None:
        """`slot` is served again: its connections here are closed, and our copies of its
        sockets (the arbiter keeps its own)."""
        for socket in self.adopted.pop(slot, []):
            socket.close(close_socket=False)

    def refresh(self, now: float) -> None:
        """Once a second (the worker's clock): the Date."""
        self.answers.refresh(now)

    def connections(self) -> int:
        return sum(len(socket.endpoint) for socket in self._all())

    def busy(self) -> bool:
        """Connections are open and not closing (a draining worker waits for them, up to
        graceful_timeout)."""
        return any(socket.endpoint.busy() for socket in self._all())

    def drain(self, drained: Any) -> None:
        """GOAWAY everywhere; `drained()` each time a socket's last connection is gone."""
        for socket in self._all():
            socket.drain(drained)

    def close(self) -> None:
        for socket in self._all():
            socket.close()
