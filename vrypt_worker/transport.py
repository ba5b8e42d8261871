"""A hub transport for protocols behind TLS: socket <-> TLSSession <-> PlaintextProtocol.

`TLSConnection` is what the worker accepts instead of `worker.Connection` when gunicorn's TLS
settings are on (`certfile`/`keyfile`; gunicorn's TLS applies to every listener). Like
`Connection` it has no greenlet: a libev io watcher calls `on_readable` directly in the loop,
which does one `recv`, feeds the ciphertext to the session, hands all the plaintext it completed
to the protocol, encrypts what the protocol answers and writes it with one `send`.

It keeps `Connection`'s contracts, so the worker's sweep, drain and eviction treat both alike:
`on_tick(keepalive, now)`, `drain()`, `close_if_idle(spare_fresh)`, `evictable()`,
`idleness()`, `close()`, and the same back-pressure (reading stops while our writes are blocked),
the same linger after the final answer (half-close, read and drop until the peer closes, at most
_LINGER_TICKS sweeps) and the same counting (`rules.answered`, max_requests recycling, the
metrics published at each final answer).

The handshake: the protocol is chosen once it is done, by `worker.choose_protocol(alpn, sock)`
(cleartext.ProtocolFactory: `http/1.1` or no ALPN: `H1Protocol`; `h2`: `H2Protocol`; `sock`
only for the client's address in the access log). Beyond the PlaintextProtocol seam the transport
uses one optional method: `release()`, called once when the connection closes, if the protocol
has it (H1Protocol gives its partial head's bytes back to the worker's head budget). A handshake
has the head timeout (VRYPT_HEAD_TIMEOUT, from the accept) to complete: a client that connects
and sends half a ClientHello is a slowloris too. A peer that breaks TLS (garbage, plain HTTP on
the TLS port, a bad certificate, a renegotiation) gets OpenSSL's alert, if any, and the close:
no HTTP answer can be sent outside TLS.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from vrypt_worker import metrics
from vrypt_worker import worker as plain  # (imports this module: attributes read at run time)
from vrypt_worker.tls import TLSError, TLSSession

_READ, _WRITE = 1, 2
_RECV_SIZE = 65536
# After the handshake, a connection's reads are this size (a small-object allocation, where
# 64 KiB is malloc'd and shrunk on every read: worker._FIRST_RECV_SIZE); a read that fills it
# (pipelining, a body) moves the connection to _RECV_SIZE for good.
_FIRST_RECV_SIZE = 512 - 33
_LINGER_TICKS = 2  # as worker._LINGER_TICKS


class TLSConnection:
    """One TLS client socket on the hub (see the module docstring)."""

    __slots__ = (
        "born",
        "due",
        "idle_ticks",
        "lingering",
        "pending",
        "protocol",
        "reader",
        "recv_size",
        "seen",
        "session",
        "sock",
        "started",
        "used",
        "worker",
        "writer",
    )

    def __init__(self, worker: Any, sock: Any, session: Any = None, protocol: Any = None) -> None:
        self.worker = worker
        self.sock = sock
        # A plain connection (h2c, cleartext.py) passes a pass-through session and its protocol.
        self.session = session or TLSSession(worker.tls_context, worker.tls_ragged_eofs)
        self.protocol: Any = protocol  # for TLS: chosen when the handshake is done
        self.pending = b""  # ciphertext the kernel did not take yet
        self.writer: Any = None
        self.seen: bool | None = None  # as Connection.seen
        self.used = False  # plaintext received (a request began after the handshake)
        self.idle_ticks = -1
        self.born = worker.accepted
        worker.accepted += 1
        self.started = time.monotonic()  # the handshake timeout runs from the accept
        self.lingering = 0
        self.recv_size = _RECV_SIZE  # the handshake's flights, then _FIRST_RECV_SIZE
        self.reader = worker.loop.io(sock.fileno(), _READ)
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
        self.seen = True
        if len(data) == self.recv_size == _FIRST_RECV_SIZE:
            self.recv_size = _RECV_SIZE  # more may be waiting
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
                protocol = self.protocol = self.worker.choose_protocol(session.alpn, self.sock)
                self.recv_size = _FIRST_RECV_SIZE
            if plain:
                self.used = True
                answer = protocol.receive(plain)
                if answer:
                    cipher = session.send(answer)
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
            self.worker.log.debug("vrypt_worker: TLS closed: %s", exc)
            self.abort()
        except Exception:
            # A bug must cost one connection, never the worker and its other clients.
            self.worker.log.exception("vrypt_worker: closing a connection after an internal error")
            self.close()

    def more(self) -> None:
        """Our writes have all gone: what the protocol held back may go now."""
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

    def on_discard(self) -> None:
        """Lingering after the final answer: read and drop until the peer closes."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()

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

    def wait_writable(self, rest: bytes) -> None:
        # The peer reads slower than it sends: stop reading it until it has taken our answers.
        self.pending = rest
        if self.reader is None:
            return
        metrics.publish(self.worker)  # a final answer may wait here
        self.reader.stop()
        if self.writer is None:
            self.writer = self.worker.loop.io(self.sock.fileno(), _WRITE)
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
            self.seen = True  # progress: the send timeout starts again
        self.pending = self.pending[sent:]
        if self.pending:
            return
        protocol = self.protocol
        try:
            if protocol is not None and not self.lingering:
                self.more()
        except TLSError:
            self.abort()
            return
        if self.pending or self.reader is None:
            return
        self.writer.stop()
        if self.lingering:
            return
        if protocol is not None and protocol.closing:
            self.finish()
        else:
            # (every plaintext byte was handed over when we stopped reading: nothing waits in
            # OpenSSL that would not wake the socket)
            self.reader.start(self.on_readable)

    # ending ---------------------------------------------------------------------------------------

    def finish(self) -> None:
        """After the final answer: close_notify, then close; when bytes may still come (an
        error, requests after the last one), half-close first and read and drop them until the
        peer closes, as Connection.linger does."""
        if self.lingering or self.reader is None:
            return
        worker = self.worker
        if worker.rules.answered >= worker.max_requests:
            worker.recycle()
        metrics.publish(worker)  # the final answer left: a rejection is counted now
        notify = self.session.close()
        if self.protocol.clean:
            self.try_send(notify)
            self.close()
            return
        self.lingering = 1
        self.try_send(notify)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        if self.reader is not None:
            self.reader.stop()
            self.reader.start(self.on_discard)

    def try_send(self, payload: bytes) -> None:
        """A last record (close_notify, an alert): one try, no waiting."""
        if payload and not self.pending:
            try:
                self.sock.send(payload)
            except OSError:
                pass

    def abort(self) -> None:
        """The peer broke TLS: its alert, if OpenSSL made one, then the close."""
        try:
            self.try_send(self.session.output())
        except Exception:
            pass
        self.close()

    def close_quietly(self) -> None:
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

    def close(self) -> None:
        if self.reader is None:
            return
        self.reader.close()
        self.reader = None
        release = getattr(self.protocol, "release", None)  # (H1Protocol: the head budget)
        if release is not None:
            release()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        try:
            self.sock.close()
        except OSError:
            pass
        self.worker.connection_closed(self)

    # the worker's sweep, drain and eviction (Connection's contracts) ----------------------------

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
            if self.seen is None and plain.never_received(self.sock):
                self.close()  # nothing sent since the accept, as Connection closes it
            return False  # mid-handshake: its timeout (or the graceful timeout) bounds it
        if not protocol.idle():
            return False
        self.on_readable()
        if self.reader is None or self.pending or self.lingering or not protocol.idle():
            return False
        if spare_fresh and not self.used:
            return True
        self.close_quietly()
        return False

    def on_tick(self, keepalive: int, now: float) -> None:
        """Once a second, from the worker's sweep: the handshake, keep-alive and send timeouts
        here, the protocol's own (head, body) in `protocol.tick`. Returns None: the timer wheel
        files it under the next sweep again (its timeouts count sweeps, not ticks)."""
        if self.lingering:
            self.lingering += 1
            if self.lingering > _LINGER_TICKS:
                self.close()
            return
        seen = self.seen
        if seen:
            self.seen = False
            self.idle_ticks = 0
        else:
            self.idle_ticks += 1
        worker = self.worker
        if self.pending:  # answers owed that the client does not take: the send timeout
            if self.idle_ticks >= worker.send_timeout:
                self.close()
            return
        protocol = self.protocol
        if protocol is None:  # the handshake timeout, from the accept
            if now - self.started >= worker.head_timeout or (
                seen is None and self.idle_ticks >= keepalive
            ):
                self.close()
            return
        try:
            out = protocol.tick(now)
            if out:
                self.send(self.session.send(out))
                if protocol.closing and not self.pending:
                    self.finish()
                return
        except TLSError:
            self.abort()
            return
        if protocol.idle() and self.idle_ticks >= keepalive:
            self.close_quietly()

    def evictable(self) -> bool:
        """An idle keep-alive connection: handshake done, nothing in progress, nothing owed."""
        return (
            self.seen is not None
            and self.reader is not None
            and not self.pending
            and not self.lingering
            and self.protocol is not None
            and self.protocol.idle()
        )

    def idleness(self) -> tuple[int, int]:
        """As Connection.idleness, on its scale (h2c connections share the worker with plain
        ones): sweeps since the last use, then age."""
        return self.idle_ticks + (not self.seen), -self.born


def serve_tls(worker: Any) -> None:
    """At worker start (run), when the server has TLS: accept TLSConnections, with the
    protocol chosen by ALPN."""
    worker.tls_ragged_eofs = bool(worker.cfg.suppress_ragged_eofs)
    worker.choose_protocol = worker.protocols.for_alpn  # cleartext.ProtocolFactory
    worker.connection_class = TLSConnection
