"""TLS from gunicorn's own settings: the server's `ssl.SSLContext`, and an I/O-free session.

The context. `server_context(cfg)` builds it exactly as gunicorn's `sock.ssl_context` means the
settings: `ssl.create_default_context(Purpose.CLIENT_AUTH, cafile=ca_certs)`, the chain from
`certfile`/`keyfile`, `verify_mode = cert_reqs` (mutual TLS with `ca_certs`), `ciphers`, and the
`ssl_context(config, default_ssl_context_factory)` server hook around that factory. The factory
also keeps the versions to TLS 1.2 and 1.3 (or the one gunicorn's deprecated `ssl_version` names,
which gunicorn itself ignores), refuses renegotiation (`OP_NO_RENEGOTIATION`, applied again after
the hook) and compression, sends one TLS 1.3 session ticket per full handshake instead of two,
and offers ALPN from `http_protocols` in its order (gunicorn's `h1` is `http/1.1` and `h2`,
chosen by worker.protocols.for_alpn). docs/tls.md says why, and what is negotiated.

Session resumption across workers: OpenSSL draws the session-ticket keys at random for every
SSL_CTX. A context made in each worker after the fork would resume only on the worker that issued
the ticket, i.e. almost never with several workers. So the context is made once per configuration
in the arbiter (VryptWorker.__init__ runs there, before the fork, `context_for`) and every worker
inherits the same keys. A reload (HUP) reads the configuration and the certificate files again:
a new context, new ticket keys; tickets issued before it fall back to a full handshake.

The session. `TLSSession` is `ssl.SSLObject` over two `ssl.MemoryBIO`s, with no socket in it:
`receive(ciphertext) -> plaintext` (driving the handshake), `send(plaintext) -> ciphertext`,
`output()` for what OpenSSL wrote by itself (handshake records, alerts, session tickets),
`close()` for close_notify. It reads plaintext until OpenSSL has none left, because bytes already
decrypted inside OpenSSL do not make the socket readable again.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

# gunicorn's `http_protocols` names and their ALPN identifiers (gunicorn.config.ALPN_PROTOCOL_MAP).
ALPN_NAMES = {"h1": "http/1.1", "h2": "h2"}
HTTP11 = "http/1.1"
# Plaintext taken from OpenSSL per SSL_read: one TLS record holds at most 16 KiB.
_READ_SIZE = 16384
# The first SSL_read of a receive asks for this much: a bytes object this small comes from
# CPython's small-object allocator, where 16 KiB would be malloc'd and shrunk with realloc on
# every request (as worker._FIRST_RECV_SIZE). A read that fills it continues with _READ_SIZE.
_FIRST_READ_SIZE = 512 - 33
# Ciphertext fed to OpenSSL, and plaintext encrypted, at most this much at a time (a record and
# its overhead): the memory BIOs never grow past it.
_PIECE = 16384 + 512


# TLS 1.3 session tickets sent after a full handshake (OpenSSL's default is 2).
TICKETS = 1
# gunicorn's `ssl_version` (deprecated there, and ignored): one of these pins the context to that
# one version, as the ssl module's PROTOCOL_TLSv1_x meant it; anything else (TLS, SSLv23,
# TLS_SERVER: gunicorn's default) leaves ours, TLS 1.2 and 1.3. A name (`--ssl-version TLSv1_2`)
# or the ssl module's constant (`ssl_version = ssl.PROTOCOL_TLSv1_2` in a conf file).
_PINNED_VERSIONS: dict[Any, ssl.TLSVersion] = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1_1": ssl.TLSVersion.TLSv1_1,
    "TLSv1_2": ssl.TLSVersion.TLSv1_2,
    int(ssl.PROTOCOL_TLSv1): ssl.TLSVersion.TLSv1,
    int(ssl.PROTOCOL_TLSv1_1): ssl.TLSVersion.TLSv1_1,
    int(ssl.PROTOCOL_TLSv1_2): ssl.TLSVersion.TLSv1_2,
}


def pinned_version(ssl_version: Any) -> ssl.TLSVersion | None:
    """The one version gunicorn's `ssl_version` asks for, or None (our defaults)."""
    if isinstance(ssl_version, str):
        ssl_version = ssl_version.removeprefix("PROTOCOL_")
    elif isinstance(ssl_version, int):
        ssl_version = int(ssl_version)
    else:
        return None
    return _PINNED_VERSIONS.get(ssl_version)


class TLSError(Exception):
    """The peer broke TLS (garbage, plain HTTP, a failed handshake or certificate check, a
    refused renegotiation): write `TLSSession.output()` (an alert, maybe) and close."""


def alpn_protocols(http_protocols: list[str] | None) -> list[str]:
    """ALPN identifiers for gunicorn's `http_protocols`, in their order of preference."""
    names = []
    for name in http_protocols or ["h1"]:
        alpn = ALPN_NAMES.get(name)
        if alpn is None or alpn in names:
            continue
        names.append(alpn)
    return names or [HTTP11]


def default_context_factory(cfg: Any) -> Callable[[], ssl.SSLContext]:
    """gunicorn's default_ssl_context_factory for these settings, plus TLS 1.2 as the least
    version, renegotiation refused and ALPN always offered (gunicorn offers it only with h2)."""

    def default_ssl_context_factory() -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cfg.ca_certs)
        context.load_cert_chain(certfile=cfg.certfile, keyfile=cfg.keyfile)
        context.verify_mode = cfg.cert_reqs
        if cfg.ciphers:
            context.set_ciphers(cfg.ciphers)
        versions = pinned_version(getattr(cfg, "ssl_version", None))
        if versions is None:
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.maximum_version = ssl.TLSVersion.TLSv1_3
        else:  # the operator's `ssl_version` wins (gunicorn itself ignores it: docs/tls.md)
            context.minimum_version = context.maximum_version = versions
        context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
        # One TLS 1.3 session ticket after a full handshake, not OpenSSL's two: each costs the
        # server a session encoded, encrypted and MACed (about 175,000 user-space instructions,
        # 6 % of a full handshake, callgrind), and a client that resumes serially needs one
        # (a resumed handshake issues one new ticket either way). docs/tls.md.
        context.num_tickets = TICKETS
        context.set_alpn_protocols(alpn_protocols(cfg.http_protocols))
        return context

    return default_ssl_context_factory


def server_context(cfg: Any) -> ssl.SSLContext:
    """The context for gunicorn's settings, through its `ssl_context` hook. Raises on a bad
    certificate, key, CA file or cipher string, or a hook that returns no SSLContext."""
    context = cfg.ssl_context(cfg, default_context_factory(cfg))
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(f"the ssl_context hook returned {type(context).__name__}, not SSLContext")
    # A hook that builds its own context still gets no renegotiation (a client-initiated
    # renegotiation costs the server a handshake per request the client pleases to send).
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


_made: tuple[Any, ssl.SSLContext] | None = None


def context_for(cfg: Any, log: Any = None) -> ssl.SSLContext:
    """The server context for this configuration object, made once (in the arbiter, before the
    workers fork, so that all of them share its session-ticket keys). gunicorn makes a new
    config object on every reload, so a reload gets a new context with the certificates read
    again. A reload whose certificates cannot be loaded keeps the previous context (and says
    why) rather than stopping every new worker."""
    global _made
    if _made is not None and _made[0] is cfg:
        return _made[1]
    try:
        context = server_context(cfg)
    except Exception:
        if _made is None or log is None:
            raise
        log.exception("TLS: the new certificates could not be loaded; keeping the previous ones")
        context = _made[1]
    _made = (cfg, context)
    return context


class TLSSession:
    """One server-side TLS connection over memory buffers: no socket, no clock.

    `receive(data)` feeds ciphertext and returns the plaintext it completed (b"" while the
    handshake runs or a record is partial, or at the peer's close_notify); after each call,
    `output()` has what must go to the peer. `handshaken` turns True once the handshake is done,
    then `alpn` is the protocol chosen (or None). `peer_closed` turns True on the peer's
    close_notify. Failures raise TLSError.
    """

    __slots__ = (
        "alpn",
        "closed",
        "handshaken",
        "incoming",
        "obj",
        "outgoing",
        "peer_closed",
        "read",
        "suppress_ragged_eofs",
        "write",
    )

    def __init__(self, context: ssl.SSLContext, suppress_ragged_eofs: bool = True) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        # The C object's read and write, without ssl.SSLObject's Python wrappers (a frame each
        # per request; they add nothing for these arguments). Both raise what the wrappers do.
        raw = getattr(self.obj, "_sslobj", self.obj)
        self.read = raw.read
        self.write = raw.write
        self.handshaken = False
        self.alpn: str | None = None
        self.peer_closed = False
        self.closed = False  # our close_notify was made
        self.suppress_ragged_eofs = suppress_ragged_eofs

    def receive(self, data: bytes) -> bytes:
        """Ciphertext in; the plaintext it completes out (all of it: read until OpenSSL has
        nothing left, since what it holds decrypted will not wake the socket again)."""
        if len(data) > _PIECE and self.handshaken:
            return self._receive_pieces(data)
        incoming = self.incoming
        incoming.write(data)
        if not self.handshaken:
            if not self._handshake():
                return b""
            if not incoming.pending:
                # The flight that ended the handshake brought no record after it (the request
                # comes in the next read): no read, whose SSLWantReadError would cost about
                # as much as the rest of this call.
                return b""
        try:
            plain = self.read(_FIRST_READ_SIZE)
        except ssl.SSLWantReadError:
            return b""
        except ssl.SSLZeroReturnError:
            self.peer_closed = True
            return b""
        except ssl.SSLError as exc:
            raise TLSError(str(exc)) from exc
        if not plain:  # (CPython gives b"" for the peer's close_notify)
            self.peer_closed = True
            return b""
        if len(plain) < _FIRST_READ_SIZE and not self.incoming.pending:
            # The common case: one small record, one read. (SSL_read returns one record at
            # most, so a read it did not fill left no decrypted byte in OpenSSL: only
            # `incoming` can hold more.)
            return plain
        return self._read_rest(plain)

    def _receive_pieces(self, data: bytes) -> bytes:
        """A large read fed a record's worth at a time: a memory BIO keeps the largest buffer
        it ever held (64 KiB per connection that once read 64 KiB, for its whole life)."""
        chunks = []
        for start in range(0, len(data), _PIECE):
            plain = self.receive(data[start : start + _PIECE])
            if plain:
                chunks.append(plain)
            if self.peer_closed:
                break
        return b"".join(chunks)

    def _read_rest(self, plain: bytes) -> bytes:
        chunks = [plain]
        obj = self.obj
        try:
            while obj.pending() or self.incoming.pending:
                chunk = self.read(_READ_SIZE)
                if not chunk:
                    self.peer_closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass  # a partial record stays in `incoming` for the next read
        except ssl.SSLZeroReturnError:
            self.peer_closed = True
        except ssl.SSLError as exc:
            raise TLSError(str(exc)) from exc
        return b"".join(chunks)

    def _handshake(self) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except (ssl.SSLError, ValueError) as exc:
            raise TLSError(str(exc)) from exc
        self.handshaken = True
        self.alpn = self.obj.selected_alpn_protocol()
        return True

    def send(self, plain: bytes) -> bytes:
        """Plaintext in, the ciphertext to write out (with anything OpenSSL had queued)."""
        if len(plain) <= _PIECE:
            try:
                self.write(plain)
            except ssl.SSLError as exc:
                raise TLSError(str(exc)) from exc
            return self.outgoing.read()
        chunks = []
        view = memoryview(plain)
        try:
            for start in range(0, len(plain), _PIECE):
                self.write(view[start : start + _PIECE])
                chunks.append(self.outgoing.read())
        except ssl.SSLError as exc:
            raise TLSError(str(exc)) from exc
        return b"".join(chunks)

    def output(self) -> bytes:
        """What OpenSSL wrote by itself: handshake records, alerts, session tickets."""
        return self.outgoing.read() if self.outgoing.pending else b""

    def eof(self) -> bool:
        """The peer closed TCP. True when that ends the session cleanly: after its close_notify,
        or without it (a ragged EOF) when `suppress_ragged_eofs` is on, as gunicorn means it."""
        return self.peer_closed or (self.handshaken and self.suppress_ragged_eofs)

    def close(self) -> bytes:
        """Our close_notify, as ciphertext (b"" when it cannot be made, or was made already)."""
        if self.closed:
            return b""
        self.closed = True
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # sent ours; the peer's is not awaited
        except (ssl.SSLError, ValueError):
            pass
        return self.output()

    def version(self) -> str | None:
        return self.obj.version()
