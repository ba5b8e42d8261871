"""gunicorn's `protocol = uwsgi` (nginx's `uwsgi_pass`): the worker's side.

`UwsgiFront` is made once per worker when gunicorn's `protocol` is `uwsgi`; the worker's accept
(`VryptWorker._accept_one`) asks it for every connection. A connection is a
transport.SessionConnection, with `PLAIN` (or a TLS session when gunicorn's TLS settings are on:
nginx's `suwsgi://`), serving an I/O-free uwsgi_protocol.UwsgiProtocol: the core's sending,
back-pressure, lingering, eviction and timeouts, and nothing copied.

A peer outside `uwsgi_allow_ips` is answered `500` and closed before anything is read, as
gunicorn's WSGI workers answer it (its `ForbiddenUWSGIRequest`); over TLS, after the handshake,
when its first bytes arrive. Refused packets are said in the error log, at most once a minute.

With gunicorn's access log on, `LoggingUwsgiProtocol` logs every answered packet through the
access log's seam (access_lines.AccessLog: `request_atoms`, `answer_atoms`, `render`,
`fresh_line`), with what gunicorn logs for a uwsgi request: the request line
`METHOD PATH_INFO[?QUERY_STRING] HTTP/1.1` from the vars, the HTTP_* vars as request headers, and
the TCP peer (nginx) as `h`. Refused packets get no line, as in gunicorn.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote_to_bytes

from vrypt_worker.access_lines import AccessLog, Client, escape
from vrypt_worker.connection import RECV_SIZE, WorkerState
from vrypt_worker.transport import PLAIN, SessionConnection
from vrypt_worker.uwsgi_framing import REFUSED, PacketRules, parse_vars
from vrypt_worker.uwsgi_protocol import AllowList, UwsgiProtocol

_WARN_EVERY = 60.0  # seconds between two warnings about refused packets
_TEMPLATES = 1024  # cached access log templates (vars blocks x kinds) before starting over
_TEMPLATE_BLOCK_MAX = 4096


class UwsgiFront:
    """One worker's uwsgi connections (module docstring)."""

    def __init__(self, state: WorkerState, cfg: Any, tls_context: Any = None) -> None:
        self.state = state
        self.packets = PacketRules(state.rules)
        self.allow = AllowList(list(cfg.uwsgi_allow_ips))
        self.table = state.responses.bytes_for
        self.tls_context = tls_context
        self.suppress_ragged_eofs = bool(getattr(cfg, "suppress_ragged_eofs", True))
        self.access: AccessLog | None = state.access_log
        self.templates: dict[tuple[bytes, int], str] = {}
        self.scheme = "https" if tls_context is not None else "http"
        self.refused = 0  # since the last warning
        self.warned = 0.0

    def protocol(self, sock: Any = None) -> UwsgiProtocol:
        state = self.state
        if self.access is not None:
            return LoggingUwsgiProtocol(self, sock)
        return UwsgiProtocol(
            self.packets,
            self.table,
            state.head_timeout,
            state.body_timeout,
            budget=state,
            report=self.report,
        )

    def connection(self, state: WorkerState, sock: Any, peer: Any) -> SessionConnection:
        """What an accepted connection from `peer` (accept's address) becomes."""
        allowed = self.allow.allows(peer)
        if self.tls_context is not None:
            from vrypt_worker.tls import TLSSession  # (only with TLS settings on)

            session = TLSSession(self.tls_context, self.suppress_ragged_eofs)
            choose = self.for_alpn if allowed else self.forbidden
            return SessionConnection(state, sock, session, None, choose)
        if allowed:
            if self.access is None:
                return UwsgiConnection(state, sock, self)
            return SessionConnection(state, sock, PLAIN, self.protocol(sock))
        # gunicorn answers before reading anything. One try into the empty send buffer (the
        # connection is not the worker's yet: no close here); the close follows at its first
        # read or the next sweep (SessionConnection: `closing`).
        protocol = self.protocol(sock)
        conn = SessionConnection(state, sock, PLAIN, protocol)
        reason = forbidden_reason(sock)
        self.report(reason)
        conn.try_send(protocol.refuse(reason))
        return conn

    def for_alpn(self, alpn: str | None, sock: Any = None) -> UwsgiProtocol:
        return self.protocol(sock)

    def forbidden(self, alpn: str | None, sock: Any = None) -> UwsgiProtocol:
        """A protocol whose first input, whatever it is, gets the 500 and the close."""
        protocol = self.protocol(sock)
        protocol.forbid(forbidden_reason(sock))
        return protocol

    def report(self, reason: str) -> None:
        """A packet was refused (500): said in the error log at most once a minute."""
        self.refused += 1
        now = time.monotonic()
        if now - self.warned >= _WARN_EVERY:
            self.state.log.warning(
                "vrypt_worker: uwsgi: %d packet(s) answered 500 since the last warning; "
                "the last: %s",
                self.refused,
                reason,
            )
            self.warned = now
            self.refused = 0

    # the access log --------------------------------------------------------------------------

    def template(self, block: bytes, kind: int) -> str:
        """The access log line for a packet's vars block and its answer kind, `%s` for the
        dynamic atoms (the peer, the time), cached by the block's bytes."""
        key = (block, kind)
        found = self.templates.get(key)
        if found is not None:
            return found
        access = self.access
        assert access is not None
        found = access.render(self.static_atoms(access, block, kind))
        if len(block) <= _TEMPLATE_BLOCK_MAX:
            if len(self.templates) >= _TEMPLATES:
                self.templates.clear()
            self.templates[key] = found
        return found

    def static_atoms(self, access: AccessLog, block: bytes, kind: int) -> dict[str, str]:
        """The atoms of one packet as gunicorn's uwsgi request makes its environ: REQUEST_METHOD,
        PATH_INFO and QUERY_STRING for the request line (`RAW_URI` is path?query, the protocol
        HTTP/1.1), the HTTP_* vars (and CONTENT_TYPE, CONTENT_LENGTH) as request headers."""
        found = parse_vars(block)[0]
        method = found.get(b"REQUEST_METHOD", b"GET")
        path = found.get(b"PATH_INFO", b"/")
        query = found.get(b"QUERY_STRING", b"")
        uri = path + b"?" + query if query else path
        fields: list[tuple[bytes, bytes]] = []
        for key, value in found.items():
            if key.startswith(b"HTTP_"):
                fields.append((key[5:].replace(b"_", b"-").lower(), value))
            elif key == b"CONTENT_TYPE":
                fields.append((b"content-type", value))
            elif key == b"CONTENT_LENGTH":
                fields.append((b"content-length", value))
        static = access.request_atoms(
            method + b" " + uri + b" HTTP/1.1", method, uri, b"HTTP/1.1", fields
        )
        if "U" in static:  # gunicorn's PATH_INFO is the var, unquoted; `?` in it is no query
            unquoted = escape(unquote_to_bytes(path) if b"%" in path else path)
            static["U"] = static["{path_info}e"] = unquoted
            static["q"] = static["{query_string}e"] = escape(query)
        static.update(access.answer_atoms(kind))
        scheme = self.scheme
        if found.get(b"HTTPS", b"").lower() in (b"on", b"1", b"true"):
            scheme = "https"
        elif b"wsgi.url_scheme" in found:
            scheme = escape(found[b"wsgi.url_scheme"])
        static["{wsgi.url_scheme}e"] = scheme
        static["{script_name}e"] = ""
        return static


class UwsgiConnection(SessionConnection):
    """A plain uwsgi connection whose reads of one whole packet are answered inline.

    What nginx's `uwsgi_pass` does on every connection: one packet, the answer, its close. A
    read that is exactly one whole packet seen before, without body, whose answer keeps the
    connection open (PacketRules.keep_alive_kind) is answered here with one `send`, as the
    plain HTTP path answers a cached head; the end of the input then closes it. Any other read
    makes the connection's UwsgiProtocol (the `choose` of SessionConnection, which serves it
    from then on: nothing of it is copied here). Measured with `python -m bench.instructions
    --uwsgi` (docs/uwsgi.md): 39,800 user-space instructions per nginx request, where a
    SessionConnection with its UwsgiProtocol made at the accept took 64,900.
    """

    __slots__ = ("front",)

    def __init__(self, state: WorkerState, sock: Any, front: UwsgiFront) -> None:
        super().__init__(state, sock, PLAIN, None, front.for_alpn)
        self.front = front

    def on_readable(self) -> None:
        if self.protocol is not None:
            SessionConnection.on_readable(self)
            return
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()  # the end between packets: nginx's close after our answer
            return
        front = self.front
        state = self.state
        self.seen = state.wheel.tick
        rules = state.rules
        kind = front.packets.keep_alive_kind(data)
        if kind >= 0 and rules.answered < rules.open_until:
            rules.answered += 1
            self.used = True  # (answered: idle between packets, the keep-alive timeout runs)
            self.send(front.table[kind])
            return
        try:
            protocol = self.protocol = self.choose(None, self.sock)  # type: ignore[misc]
            self.wheel_next()
            answer = protocol.receive(data)
            if answer:
                self.send(answer)
                self.more()
            if protocol.closing and not self.pending:
                self.finish()
        except Exception:
            # A bug must cost one connection, never the worker and its other clients.
            state.log.exception("vrypt_worker: closing a connection after an internal error")
            self.close()

    def wheel_next(self) -> None:
        """Looked at by the next sweep: a packet or body may have begun, whose timeouts the
        protocol counts (as SessionConnection.on_readable files a read after a quiet spell)."""
        wheel = self.state.wheel
        if self.due > wheel.tick + 1:
            wheel.file(self, wheel.tick + 1)

    # between packets, before a protocol is made -----------------------------------------------

    def release(self) -> None:
        # (SessionConnection's getattr on a missing protocol raises and catches inside: about
        # a microsecond per connection that nginx closes)
        if self.protocol is not None:
            self.protocol.release()

    def idle(self) -> bool:
        protocol = self.protocol
        return self.used if protocol is None else protocol.idle()

    def timers(self, keepalive: int, now: float, tick: int, seen: int) -> int | None:
        if self.protocol is None and self.used:  # answered inline: keep-alive only
            due = seen + 1 + keepalive
            if tick < due:
                return due
            self.close()
            return None
        return SessionConnection.timers(self, keepalive, now, tick, seen)

    def close_if_idle(self, spare_fresh: bool = False) -> bool:
        if self.protocol is None and self.used:
            if self.reader is not None and not self.pending and not self.lingering:
                self.close()
            return False
        return SessionConnection.close_if_idle(self, spare_fresh)


def forbidden_reason(sock: Any) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        peer = "?"
    return f"uwsgi request from {peer[0] if isinstance(peer, tuple) else peer!r} not allowed"


class LoggingUwsgiProtocol(UwsgiProtocol):
    """A UwsgiProtocol that logs every packet it answers (module docstring): the framer
    records the vars block of each answer it gives (PacketFramer.feed's `blocks`)."""

    __slots__ = ("access", "blocks", "client", "front")

    def __init__(self, front: UwsgiFront, sock: Any = None) -> None:
        state = front.state
        super().__init__(
            front.packets,
            front.table,
            state.head_timeout,
            state.body_timeout,
            budget=state,
            report=front.report,
        )
        self.front = front
        self.access: AccessLog = front.access  # type: ignore[assignment]
        self.client = Client.of(sock)
        self.blocks: list[bytes | None] = []

    def feed(self, data: bytes) -> list[int]:
        access = self.access
        start = time.perf_counter() if access.timed else 0.0
        blocks = self.blocks
        out = self.framer.feed(data, blocks)
        if blocks:
            client = self.client
            lines = access.lines
            for kind, block in zip(out, blocks, strict=True):
                if block is None or kind == REFUSED:
                    continue
                template = self.front.template(block, kind)
                if template is access.line_template and client.log_addr == access.line_addr:
                    lines.append(access.last_line)  # same packet, same peer, same second
                else:
                    lines.append(access.fresh_line(client, template, start))
            blocks.clear()
        return out


__all__ = ["LoggingUwsgiProtocol", "UwsgiFront"]
