"""What an accepted connection becomes, chosen once per worker from its settings.

- plain HTTP/1 (`plain.Connection`, or the access log's `LoggingConnection`), read at the accept
  when `TCP_DEFER_ACCEPT` is on (`plain.FirstRead`);
- TLS (gunicorn's `certfile`/`keyfile`): a `transport.SessionConnection` with a `tls.TLSSession`,
  the protocol chosen by ALPN; with `TCP_DEFER_ACCEPT`, the ClientHello is answered at the accept
  (`tls_accept.TLSFirstRead`);
- h2c from trusted peers (`http2_cleartext`): a `SessionConnection` behind the pass-through
  session, the protocol decided on the first bytes (`protocols.Negotiation`);
- gunicorn's `protocol = uwsgi`: `uwsgi.UwsgiFront`'s connection;
- with `proxy_protocol` on, every accept goes first to the PROXY stage (`proxied.ProxyStage`),
  which makes one of the above once the header is read.

The worker (worker.py, `VryptWorker._accept_one`) keeps the hot choices as its own attributes
(`read_at_accept`, `first_read`, `proxy`, `take`): one attribute each per new connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vrypt_worker.connection import BaseConnection, WorkerState
from vrypt_worker.h2 import H2Answers, H2Config, H2cPolicy
from vrypt_worker.plain import FirstRead
from vrypt_worker.protocols import ProtocolFactory
from vrypt_worker.proxied import ProxyStage
from vrypt_worker.tls import TLSSession
from vrypt_worker.tls_accept import TLSFirstRead
from vrypt_worker.transport import PLAIN, SessionConnection
from vrypt_worker.uwsgi import UwsgiFront


class Intake:
    """The choices above, for one worker (`add` gives a new connection to the worker)."""

    def __init__(
        self,
        state: WorkerState,
        cfg: Any,
        connection_class: type[BaseConnection],
        tls_context: Any,
        add: Callable[[BaseConnection], None],
        defer_accept: bool,
        tcp_answer: Any,
    ) -> None:
        self.state = state
        self.add = add
        self.tls_context = tls_context
        # (read once: gunicorn's Config.__getattr__ costs a few Python calls per new connection)
        self.ragged_eofs = bool(cfg.suppress_ragged_eofs)
        self.defer_accept = defer_accept
        # HTTP/1 inside TLS and HTTP/2 (by ALPN, or h2c from trusted peers) are protocols behind
        # a session (transport.py); plain HTTP/1 stays on plain.Connection.
        self.protocols = ProtocolFactory(
            state,
            H2cPolicy.from_config(cfg),
            H2Config.from_gunicorn(cfg, head_timeout=state.head_timeout),
            H2Answers(time.time(), tcp_answer),
        )
        policy = self.protocols.policy
        # Only then does an accept look at the peer (h2c is for trusted peers only).
        self.h2c = self.protocols if policy.available and policy.mode != "off" else None
        self.connection_class: Any = connection_class
        if tls_context is not None:
            self.connection_class = self.tls_connection
        # gunicorn's `protocol = uwsgi` (nginx's uwsgi_pass): packets, not HTTP (uwsgi.py).
        self.uwsgi = UwsgiFront(state, cfg, tls_context) if cfg.protocol == "uwsgi" else None
        plain = tls_context is None and self.h2c is None
        # Plain HTTP/1 only (not TLS, not h2c, not uwsgi); with the access log on too, which is
        # told of an answer given there.
        self.read_at_accept = defer_accept and plain and self.uwsgi is None
        # (a bound method made once: calling it costs less than calling an instance)
        self.first_read = FirstRead(state, self.connection_class, add).read
        if defer_accept and tls_context is not None and self.uwsgi is None:
            self.read_at_accept = True  # the ClientHello, at the accept (tls_accept.py)
            self.first_read = TLSFirstRead(state, self.tls_connection, add).read
        # PROXY protocol (`proxy_protocol`): every connection's header first, then the connection
        # `connection` makes; the stage does its own read at the accept (proxied.py).
        stage = ProxyStage.from_config(
            cfg, state, self.connection, add, defer_accept, self.first_read if plain else None
        )
        self.proxy = stage.accept if stage is not None else None
        if stage is not None:
            self.read_at_accept = False

    def tls_connection(self, state: WorkerState, sock: Any) -> SessionConnection:
        """What a TLS listener's connection becomes: a session, the protocol chosen by ALPN."""
        session = TLSSession(self.tls_context, self.ragged_eofs)
        return SessionConnection(state, sock, session, None, self.protocols.for_alpn)

    def connection(self, sock: Any, peer: Any) -> BaseConnection:
        """The connection a socket just accepted from `peer` becomes."""
        if self.uwsgi is not None:  # protocol = uwsgi (uwsgi.py), plain or TLS
            return self.uwsgi.connection(self.state, sock, peer)
        if self.h2c is not None:  # h2c for trusted peers (protocols.py), else Connection
            negotiation = self.h2c.negotiation(peer, sock)
            if negotiation is not None:
                return SessionConnection(self.state, sock, PLAIN, negotiation)
        return self.connection_class(self.state, sock)

    def take(self, sock: Any, peer: Any) -> None:
        """A socket just accepted (not read at the accept): its connection, to the worker."""
        conn = self.connection(sock, peer)
        self.add(conn)
        if self.uwsgi is not None and self.defer_accept:
            conn.on_readable()  # its packet is usually here: answered now, not next turn
