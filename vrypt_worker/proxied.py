"""The PROXY protocol stage: a connection's first bytes, before anything else reads it.

With gunicorn's `proxy_protocol` on (v1, v2, auto), every accepted connection comes here first
(`ProxyStage.accept`, called by the worker's accept loop in place of the first read): the header
is read (proxy_header.py, the I/O-free reader), then the socket, the client the header carried
and the bytes read after it go to the ordinary connection the worker would have made without the
setting: plain HTTP/1 (`plain.Connection`, or the access log's), TLS or h2c
(`transport.SessionConnection`). The header is first on the wire, before TLS's ClientHello and
before HTTP/2's preface, as HAProxy and AWS NLB send it, so it works with every transport.

Once the header has been read the stage is gone: the connection is the ordinary one. Its
keep-alive requests cost what they cost without PROXY (docs/proxy-protocol.md, "What it costs").

Two paths:
- the usual one, on a plain HTTP/1 listener with the access log off: the stage reads at the
  accept (TCP_DEFER_ACCEPT: the load balancer's header usually arrives with the first request,
  in one segment), `proxy_header.header_length` finds a complete valid header from an allowed
  peer, and the bytes after it go to `plain.FirstRead` as the connection's first read (its
  descriptor path answers a closing request without a socket object), in the same turn;
- every other case (TLS, h2c, the access log on, a split, malformed or refused header): a
  socket object and `decide`. A header not complete yet makes a `HeaderConnection`, which reads
  until it is, bounded by the head timeout (the header is part of the first request's head) and
  by the format's own size; then the ordinary connection gets the socket as a `ProxiedSocket`
  (its `getpeername` is the client the header carried, which the access log asks for `h`,
  `{remote_addr}e`, `{remote_port}e`) and the bytes after the header as its first `recv`
  (`ReplayingSocket`), read by its own code in the same turn.

What gunicorn does, as it does it (gunicorn/http/message.py): a header from a peer not in
`proxy_allow_ips` is answered `403 Forbidden`; a malformed one `400 Bad Request`; bytes that do
not begin a header are served as without the setting; a connection that closes mid-header is
closed. docs/proxy-protocol.md has the rest and the differences.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from _socket import socket as RawSocket
from collections.abc import Callable
from typing import Any

from vrypt_worker.connection import (
    FIRST_RECV_SIZE,
    SPARE_READERS,
    BaseConnection,
    WorkerState,
    never_received,
)
from vrypt_worker.framing import BAD_REQUEST
from vrypt_worker.proxy_header import (
    MODES,
    NOT_PROXY,
    PARTIAL,
    ProxyHeaderError,
    detect,
    header_length,
    parse,
)

_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_AF_UNIX = socket.AF_UNIX
# The read at the accept: a header (107 bytes at most for v1, 16 + addresses + TLVs for v2) and
# usually the first request's head. What does not fit stays in the kernel, which wakes the
# connection for it.
_FIRST_READ = FIRST_RECV_SIZE  # (a small bytes object: connection.py says why)
_READ = 4096
# Peers of `proxy_allow_ips` looked up so far (address -> allowed), at most this many.
_ALLOWED_CACHE = 4096


class ProxiedSocket(RawSocket):
    """A client socket whose peer, for whoever asks (the access log), is the client the PROXY
    header carried (`peer`; None: the connection's own). Every other method is the C socket's:
    reads and writes cost what they cost on a plain socket object."""

    __slots__ = ("peer", "rest")

    def getpeername(self) -> Any:
        peer = self.peer
        return peer if peer is not None else RawSocket.getpeername(self)


class ReplayingSocket(ProxiedSocket):
    """A ProxiedSocket whose first `recv` returns the bytes the stage read after the header
    (all of them, whatever size is asked: the kernel no longer holds them, so nothing would wake
    the connection for a rest); it is a plain ProxiedSocket again from then on."""

    __slots__ = ()

    def recv(self, size: int, flags: int = 0) -> bytes:  # type: ignore[override]
        self.__class__ = ProxiedSocket
        rest = self.rest
        self.rest = b""
        return rest


class ProxyStage:
    """The worker's accept-time stage (module docstring). `make(sock, peer)` makes the ordinary
    connection for a socket (`peer`: the TCP peer, for h2c's trust), `add(conn)` gives it to
    the worker."""

    __slots__ = (
        "add",
        "allowed",
        "first_read",
        "make",
        "networks",
        "read_first",
        "state",
        "v1",
        "v2",
    )

    def __init__(
        self,
        state: WorkerState,
        mode: str,
        allow_ips: list[str],
        networks: list[Any],
        make: Callable[[Any, Any], BaseConnection],
        add: Callable[[BaseConnection], None],
        read_first: bool,
        first_read: Callable[[int, int, bytes], None] | None = None,
    ) -> None:
        self.state = state
        # plain.FirstRead.read for plain HTTP/1 listeners (not TLS, not h2c): what follows the
        # header goes to the first read the connection would have had without PROXY.
        self.first_read = first_read
        self.v1, self.v2 = MODES[mode]
        self.make = make
        self.add = add
        self.read_first = read_first
        # gunicorn's proxy_protocol_access_check: `*`, else the address in one of the networks.
        self.networks = None if "*" in allow_ips else networks
        self.allowed: dict[str, bool] = {}

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        state: WorkerState,
        make: Callable[[Any, Any], BaseConnection],
        add: Callable[[BaseConnection], None],
        read_first: bool,
        first_read: Callable[[int, int, bytes], None] | None = None,
    ) -> ProxyStage | None:
        """The stage for gunicorn's settings, or None when `proxy_protocol` is off."""
        mode = cfg.proxy_protocol or "off"
        if mode == "off":
            return None
        allow = list(cfg.proxy_allow_ips)
        networks = cfg.proxy_allow_networks()
        return cls(state, mode, allow, networks, make, add, read_first, first_read)

    def may_send(self, peer: Any) -> bool:
        """Whether `peer` (the TCP peer) may send a PROXY header (`proxy_allow_ips`). A unix
        socket's peer may, as in gunicorn."""
        networks = self.networks
        if networks is None or not isinstance(peer, tuple):
            return True
        host = peer[0]
        allowed = self.allowed.get(host)
        if allowed is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                allowed = False
            else:
                if address.version == 6 and address.ipv4_mapped is not None:
                    # An IPv4 proxy on the default dual-stack `[::]` listener (families.py):
                    # `127.0.0.1` in proxy_allow_ips still means it, as for h2c's trust.
                    address = address.ipv4_mapped
                allowed = any(address in network for network in networks)
            if len(self.allowed) < _ALLOWED_CACHE:
                self.allowed[host] = allowed
        return allowed

    def accept(self, fd: int, family: int, peer: Any) -> None:
        """A connection just accepted (`fd` from accept4, `peer` its address). The usual case,
        a whole header and what follows it in the read at the accept, costs the read,
        `header_length` and the ordinary first read (`first_read`: plain.FirstRead, whose
        descriptor path answers a closing request without a socket object); anything else
        goes through a socket object and `decide`."""
        data = b""
        try:
            os.set_blocking(fd, False)
            if self.read_first:
                data = os.read(fd, _FIRST_READ)
                if not data:  # connected and closed without a byte
                    os.close(fd)
                    return
        except (BlockingIOError, InterruptedError):
            pass  # nothing yet: a HeaderConnection waits for it
        except OSError:
            os.close(fd)
            return
        first_read = self.first_read
        if data and first_read is not None:
            length = header_length(data, self.v1, self.v2)
            if length == 0:  # no header: the connection as without the setting
                first_read(fd, family, data)
                return
            # A valid header, from a peer that may send one (a cached verdict for its address),
            # and nobody asks which client it carried (the access log is off): the rest is the
            # connection's first read. Anything else: a socket object, and decide().
            if (
                length > 0
                and self.state.access_log is None
                and (
                    self.networks is None
                    or family == _AF_UNIX
                    or self.allowed.get(peer[0])
                    or self.may_send(peer)
                )
            ):
                first_read(fd, family, data[length:])
                return
        sock = ProxiedSocket(family, _NONBLOCKING_STREAM, 0, fd)
        sock.peer = None
        sock.rest = b""
        self.decide(sock, peer, data, None)

    def decide(self, sock: Any, peer: Any, data: bytes, waiting: HeaderConnection | None) -> None:
        """What `data`, every byte read so far, makes of the connection: handed over, answered
        (403, 400), or waiting for more (in `waiting`, made here when needed)."""
        version = detect(data, self.v1, self.v2)
        if version == NOT_PROXY:
            self.hand_over(sock, peer, data, None, waiting)
            return
        if version != PARTIAL:
            if not self.may_send(peer):
                self.refuse(sock, peer, waiting, forbidden=True)
                return
            try:
                header = parse(data, version)
            except ProxyHeaderError as exc:
                self.state.log.debug("vrypt_worker: invalid PROXY header from %s: %s", peer, exc)
                self.refuse(sock, peer, waiting, forbidden=False)
                return
            if header is not None:
                self.hand_over(sock, peer, data[header.length :], header.source, waiting)
                return
        if waiting is None:
            waiting = HeaderConnection(self.state, sock, peer, self)
            self.add(waiting)
        waiting.buf = data

    def hand_over(
        self,
        sock: Any,
        peer: Any,
        rest: bytes,
        client: tuple[str, int] | None,
        waiting: HeaderConnection | None,
    ) -> None:
        """The header is done (or there is none): the ordinary connection takes the socket, and
        the bytes after the header are its first read."""
        sock.peer = client
        if waiting is not None:
            waiting.detach()
        conn = self.make(sock, peer)
        self.add(conn)
        if waiting is not None:
            conn.born = waiting.born  # its place in the accept order, for eviction
        if rest:
            sock.rest = rest
            sock.__class__ = ReplayingSocket
            conn.on_readable()  # type: ignore[attr-defined]  # every connection class reads so

    def refuse(
        self, sock: Any, peer: Any, waiting: HeaderConnection | None, forbidden: bool
    ) -> None:
        """gunicorn's answer to a header it refuses (403 from a peer not allowed, 400 when
        malformed), in cleartext, then the close."""
        if waiting is None:
            waiting = HeaderConnection(self.state, sock, peer, self)
            self.add(waiting)
        waiting.refuse(forbidden)


def _forbidden(bad_request: bytes) -> bytes:
    """The 403 answer, made from the current 400 (same fields, Date included)."""
    head, _, _body = bad_request.partition(b"\r\n\r\n")
    body = b"Forbidden\n"
    head = head.replace(b"400 Bad Request", b"403 Forbidden", 1)
    start = head.index(b"Content-Length: ")
    end = head.index(b"\r\n", start)
    return head[:start] + b"Content-Length: %d" % len(body) + head[end:] + b"\r\n\r\n" + body


class HeaderConnection(BaseConnection):
    """A connection whose PROXY header is not complete yet: reads until it is (or until the
    head timeout, counted from the accept), then the stage hands it over."""

    __slots__ = ("buf", "peer", "stage", "started")

    def __init__(self, state: WorkerState, sock: Any, peer: Any, stage: ProxyStage) -> None:
        super().__init__(state, sock)
        self.peer = peer
        self.stage = stage
        self.buf = b""
        self.started = time.monotonic()
        self.reader.start(self.on_readable)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:  # closed mid-header (gunicorn: NoMoreData, a quiet close)
            self.close()
            return
        self.seen = self.state.wheel.tick
        try:
            # (bounded: detect and parse decide within the format's own size, 64 KiB for v2)
            self.stage.decide(self.sock, self.peer, self.buf + data, self)
        except Exception:
            # A bug must cost one connection, never the worker and its other clients.
            self.state.log.exception("vrypt_worker: closing a connection after an internal error")
            self.close()
            return

    def detach(self) -> None:
        """The header is read: leave the socket (open) and the worker's books to the ordinary
        connection, which the stage adds before this one goes (a draining worker must never
        see itself without connections in between)."""
        reader = self.reader
        if reader is None:
            return
        self.reader = None
        reader.stop()
        state = self.state
        if len(state.spare_readers) < SPARE_READERS:
            state.spare_readers.append(reader)
        else:
            reader.close()
        self.sock = None
        state.closed(self)

    def refuse(self, forbidden: bool) -> None:
        state = self.state
        rules = state.rules
        rules.rejected += 1
        rules.answered += 1
        table = state.responses.bytes_for
        self.buf = b""
        self.send(_forbidden(table[BAD_REQUEST]) if forbidden else table[BAD_REQUEST])
        if not self.pending:
            self.linger(False)

    # the core's hooks -------------------------------------------------------------------------

    def resume(self) -> None:
        self.linger(False)  # only an answer (403, 400) is ever sent: then the close

    def idle(self) -> bool:
        return False  # a header is in progress from the accept: never evicted as idle

    def timers(self, keepalive: int, now: float, tick: int, seen: int) -> int | None:
        """The head timeout from the accept (the header is part of the first head); before any
        byte, the keep-alive timeout too, as for a plain connection."""
        left = self.state.head_timeout - (now - self.started)
        due = tick + max(1, int(left)) if left > 0 else tick
        if self.seen < 0:
            due = min(due, seen + 1 + keepalive)
        if tick < due:
            return due
        self.close()
        return None

    def drain(self) -> None:
        """Graceful shutdown: nothing to announce before a header."""

    def close_if_idle(self, spare_fresh: bool = False) -> bool:
        """Draining: a connection that has sent nothing is spared while fresh, then closed; one
        mid-header is left to the head timeout (or the graceful timeout)."""
        if self.reader is None or self.pending or self.lingering or self.buf:
            return False
        if spare_fresh:
            return True
        if never_received(self.sock):
            self.close()
        return False
