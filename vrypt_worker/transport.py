"""Connections behind a session: socket <-> session <-> PlaintextProtocol, on the connection core.

`SessionConnection` is what the worker accepts when gunicorn's TLS settings are on (`certfile`,
`keyfile`; gunicorn's TLS applies to every listener), with a `tls.TLSSession`; and, for a plain
connection from a peer that may speak h2c (protocols.py), with `PLAIN`, a pass-through session.
Like the plain connection it has no greenlet: a libev io watcher calls `on_readable` directly in
the loop, which does one `recv`, feeds the bytes to the session, hands all the plaintext it
completed to the protocol, wraps what the protocol answers and writes it with one `send`.

Sending, back-pressure, lingering, closing, eviction and the send timeout are the core's
(connection.py). Here: the handshake (the protocol is chosen once it is done, by
`choose_protocol(alpn, sock)`, protocols.ProtocolFactory.for_alpn: `h2` gets HTTP/2, anything
else HTTP/1.1), its timeout (the head timeout, from the accept: a client that connects and sends
half a ClientHello is a slowloris too), the keep-alive timeout, and the protocol's own timeouts
(`tick`, `deadline`). A peer that breaks TLS (garbage, plain HTTP on the TLS port, a bad
certificate, a renegotiation) gets OpenSSL's alert, if any, and the close: no HTTP answer can be
sent outside TLS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vrypt_worker.connection import (
    FIRST_RECV_SIZE,
    RECV_SIZE,
    BaseConnection,
    WorkerState,
    never_received,
)
from vrypt_worker.protocol import PlaintextProtocol
from vrypt_worker.tls import TLSError


class PlainSession:
    """TLSSession's interface for a connection without TLS: bytes pass through unchanged."""

    __slots__ = ()
    handshaken = True
    alpn = None
    peer_closed = False

    @staticmethod
    def receive(data: bytes) -> bytes:
        return data

    @staticmethod
    def send(plain: bytes) -> bytes:
        return plain

    @staticmethod
    def output() -> bytes:
        return b""

    @staticmethod
    def eof() -> bool:
        return True

    @staticmethod
    def close() -> bytes:
        return b""


PLAIN = PlainSession()


class SessionConnection(BaseConnection):
    """One client socket behind a session (see the module docstring)."""

    __slots__ = ("choose", "protocol", "recv_size", "session", "started", "used")

    def __init__(
        self,
        state: WorkerState,
        sock: Any,
        session: Any,
        protocol: Any = None,
        choose: Callable[[str | None, Any], Any] | None = None,
    ) -> None:
        super().__init__(state, sock)
        self.session = session
        # A plain connection (h2c) comes with its protocol; TLS chooses one after the handshake.
        self.protocol: PlaintextProtocol | Any = protocol
        self.choose = choose
        self.used = False  # plaintext received (a request began after the handshake)
        self.started = time.monotonic()  # the handshake timeout runs from the accept
        self.recv_size = RECV_SIZE  # the handshake's flights, then FIRST_RECV_SIZE
        self.reader.start(self.on_readable)

    # reading --------------------------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(self.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.on_eof()
            return
        wheel = self.state.wheel
        tick = self.seen = wheel.tick
        if self.due > tick + 1:
            # Filed for a keep-alive timeout (or not at all yet): input may begin a head, a body
            # or a stream, whose timeouts the protocol counts from what it sees at the next
            # sweep. Once per quiet spell, not per read.
            wheel.file(self, tick + 1)
        if len(data) == self.recv_size == FIRST_RECV_SIZE:
            self.recv_size = RECV_SIZE  # more may be waiting
        session = self.session
        try:
            plain = session.receive(data)
            protocol = self.protocol
            if protocol is None:
                if not session.handshaken:
                    out = session.output()  # the server's handshake flight
                    if out:
                        self.send(out)
                    return
                protocol = self.protocol = self.choose(session.alpn, self.sock)  # type: ignore[misc]
                self.recv_size = FIRST_RECV_SIZE
            if plain:
                self.used = True
                answer = protocol.receive(plain)
                if answer:
                    cipher = session.send(answer)
                    if protocol.closing and not self.lingering:
                        # The final answer and our close_notify in one write, not two.
                        cipher += session.close()
                    if self.pending:
                        self.pending += cipher
                        return
                    try:
                        sent = self.sock.send(cipher)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        self.close()
                        return
                    if sent != len(cipher):
                        self.wait_writable(cipher[sent:])
                    elif protocol.closing:
                        self.finish()
                    else:
                        answer = protocol.writable()  # all went: what it held back may go
                        if answer:
                            self.send(session.send(answer))
                            self.more()
                            if protocol.closing and not self.pending:
                                self.finish()
                    return
            out = session.output()  # session tickets, a KeyUpdate's answer
            if out:
                self.send(out)
            if session.peer_closed:
                self.on_eof()
            elif protocol.closing and not self.pending:
                self.finish()
        except TLSError as exc:
            self.state.log.debug("vrypt_worker: TLS closed: %s", exc)
            self.abort()
        except Exception:
            # A bug must cost one connection, never the worker and its other clients.
            self.state.log.exception("vrypt_worker: closing a connection after an internal error")
            self.close()

    def more(self) -> None:
        """Our writes have all gone: what the protocol held back may go now. (Sending one batch
        per loop turn instead, as a pending write, halved a bystander's p99 beside a client
        whose every read owes 40 batches, but raised the memory a connection that never reads
        holds from 9 to 56 KB over h2c and from 41 to 127 KB over TLS, in
        tests/test_h2_live_attacks.py: reverted, docs/http2.md.)"""
        protocol = self.protocol
        while not self.pending and self.reader is not None:
            answer = protocol.writable()
            if not answer:
                return
            self.send(self.session.send(answer))

    def on_eof(self) -> None:
        """The peer closed TCP (or sent close_notify). The protocol hears of it when that ends
        the session cleanly (close_notify, or `suppress_ragged_eofs` as gunicorn means it)."""
        protocol = self.protocol
        if protocol is not None and self.session.eof():
            try:
                answer = protocol.eof()
                if answer:
                    self.send(self.session.send(answer))
            except Exception:
                pass
        self.close()

    # ending ---------------------------------------------------------------------------------------

    def finish(self) -> None:
        """After the final answer: close_notify, then the close (lingering when bytes may still
        come, connection.BaseConnection.linger)."""
        if self.lingering or self.reader is None:
            return
        self.linger(self.protocol.clean, self.session.close())

    def abort(self) -> None:
        """The peer broke TLS: its alert, if OpenSSL made one, then the close."""
        try:
            self.try_send(self.session.output())
        except Exception:
            pass
        self.close()

    def close_idle(self) -> None:
        """Closing an idle connection (keep-alive timeout, draining): the protocol's goodbye
        (HTTP/2: GOAWAY, so the client knows no stream was lost; HTTP/1: nothing), then
        close_notify."""
        if self.reader is not None and self.protocol is not None:
            try:
                goodbye = self.protocol.shutdown()
                wrapped = self.session.send(goodbye) if goodbye else b""
                self.try_send(wrapped + self.session.close())
            except TLSError:
                pass
        self.close()

    # the core's hooks -------------------------------------------------------------------------

    def refill(self) -> bool:
        if self.protocol is not None and not self.lingering:
            try:
                self.more()
            except TLSError:
                self.abort()
                return False
        return not self.pending

    def resume(self) -> None:
        if self.lingering:
            return
        protocol = self.protocol
        if protocol is not None and protocol.closing:
            self.finish()
        else:
            # (every plaintext byte was handed over when we stopped reading: nothing waits in
            # OpenSSL that would not wake the socket)
            self.reader.start(self.on_readable)

    def release(self) -> None:
        release = getattr(self.protocol, "release", None)  # (H1Protocol: the head budget)
        if release is not None:
            release()

    def idle(self) -> bool:
        protocol = self.protocol
        return protocol is not None and protocol.idle()

    def timers(self, keepalive: int, now: float, tick: int, seen: int) -> int | None:
        """The handshake and keep-alive timeouts, and the protocol's own (`tick`: HTTP/1's head
        and body, HTTP/2's stalled frames and idle rule, the h2c decision). A protocol with
        something in progress is looked at every sweep (its timeouts count from what it saw
        there); an idle one only when its keep-alive timeout is due, or after its next read
        (`on_readable` files it under the next sweep)."""
        state = self.state
        protocol = self.protocol
        if protocol is None:  # the handshake, from the accept
            left = state.head_timeout - (now - self.started)
            due = tick + max(1, int(left)) if left > 0 else tick
            if self.seen < 0:  # nothing received at all: the keep-alive timeout too
                due = min(due, seen + 1 + keepalive)
            if tick < due:
                return due
            self.close()
            return None
        # When the last input came, as a monotonic time: the middle of the second before the
        # sweep after it. A timeout of N seconds counted from there fires at the sweep of tick
        # seen + 1 + N, as on the plain path, whatever the sweeps' jitter (under half a second).
        last_input = now - (tick - seen - 1) - 0.5
        try:
            out = protocol.tick(now, last_input)
            if out:
                self.send(self.session.send(out))
                if protocol.closing and not self.pending:
                    self.finish()
                return None if self.reader is None else tick + 1
        except TLSError:
            self.abort()
            return None
        if protocol.closing:  # a timeout that ends the connection without an answer (uwsgi)
            self.finish()
            return None if self.reader is None else tick + 1
        if not protocol.idle():
            return tick + 1
        due = seen + 1 + keepalive
        if tick < due:
            return due
        self.close_idle()
        return None

    # draining -------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Graceful shutdown: the protocol's announcement (GOAWAY; nothing for HTTP/1, whose
        answers now say close), and a request already waiting in the kernel is answered now."""
        if self.reader is None or self.pending or self.lingering or self.protocol is None:
            return
        try:
            out = self.protocol.shutdown()
            if out:
                self.send(self.session.send(out))
        except TLSError:
            self.abort()
            return
        if self.protocol.idle() and not self.pending:
            self.on_readable()

    def close_if_idle(self, spare_fresh: bool = False) -> bool:
        """Draining: close this connection if nothing is in progress. A handshake in progress,
        or one done with no request yet, is spared while fresh (its request is on its way)."""
        if self.reader is None or self.pending or self.lingering:
            return False
        protocol = self.protocol
        if protocol is None:
            if spare_fresh:
                return True
            if self.seen < 0 and never_received(self.sock):
                self.close()  # nothing sent since the accept, as the plain connection closes it
            return False  # mid-handshake: its timeout (or the graceful timeout) bounds it
        if not protocol.idle():
            return False
        self.on_readable()
        if self.reader is None or self.pending or self.lingering or not protocol.idle():
            return False
        if spare_fresh and not self.used:
            return True
        self.close_idle()
        return False
