"""Choosing the protocol of a connection: HTTP/1 or HTTP/2, by ALPN after a TLS handshake
(`ProtocolFactory.for_alpn`), and for a plain connection from a trusted peer by its first bytes
(h2c, `Negotiation`), as gunicorn's `http2_cleartext` defines it.

Only peers that may negotiate h2c get here (h2/negotiation.py: `http2_cleartext` on, `h2` in
`http_protocols`, the peer in `forwarded_allow_ips`); every other plain connection is the worker's
own `Connection`, whose hot path this leaves untouched. For these, `Negotiation` is the connection's
protocol until the decision, then it hands every byte to the protocol chosen:

- prior knowledge (`prior-knowledge`, `both`): the client preface `PRI * HTTP/2.0...` means
  HTTP/2 from the first byte. Anything else is HTTP/1, or, when prior knowledge is the only
  mechanism (a trusted peer that should speak HTTP/2 and does not), an invalid preface: our
  SETTINGS, GOAWAY(PROTOCOL_ERROR) and close (RFC 9113 §3.4), never an HTTP/1 answer.
- upgrade (`upgrade`, `both`): a first request that is a well-formed `Upgrade: h2c` (with
  HTTP2-Settings, a body of at most 64 KiB and not chunked) is answered `101 Switching
  Protocols`, its body skipped, and the connection continues in HTTP/2 with that request as
  stream 1. Only the first request of a connection can upgrade (what curl and every other h2c
  client does); an `Upgrade: h2c` on a later request is answered in HTTP/1.1.

The transport is transport.SessionConnection, with `transport.PLAIN` in place of TLS: one code
path for back-pressure, linger, timeouts and draining, whatever the bytes are wrapped in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vrypt_worker import access_log
from vrypt_worker.framing import ERRORS
from vrypt_worker.h1_protocol import H1Protocol
from vrypt_worker.h2 import (
    H2C_PREFACE_TIMEOUT,
    MATCH,
    PARTIAL,
    UPGRADE_101,
    H2cPolicy,
    H2Protocol,
    preface_match,
    upgrade_request,
)

# The first head is looked at for an upgrade only up to this size; a longer one is HTTP/1's to
# judge (its own limits answer 414/431).
_UPGRADE_HEAD_MAX = 16 * 1024
_KIND_MASK = 0xF  # framing's packed verdict: the answer kind in bits 0-3


class Negotiation:
    """The protocol of a trusted plain connection until its first bytes decide (module
    docstring); afterwards a thin forwarder to the protocol chosen."""

    __slots__ = ("_buf", "_since", "chosen", "clock", "factory", "prior", "sock", "upgrade")

    def __init__(
        self,
        factory: Any,
        prior: bool,
        upgrade: bool,
        sock: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory  # the worker's ProtocolFactory
        self.sock = sock  # for the access log's client address
        self.prior = prior
        self.upgrade = upgrade
        self.clock = clock
        self.chosen: Any = None
        self._buf = b""
        self._since = 0.0  # when the first byte came (clock): a head's timeout counts from it

    # forwarded once chosen -------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self.chosen is not None and self.chosen.closing

    @property
    def clean(self) -> bool:
        return self.chosen is None or self.chosen.clean

    def idle(self) -> bool:
        chosen = self.chosen
        return not self._buf if chosen is None else chosen.idle()

    def shutdown(self) -> bytes:
        return b"" if self.chosen is None else self.chosen.shutdown()

    def writable(self) -> bytes:
        return b"" if self.chosen is None else self.chosen.writable()

    def eof(self) -> bytes:
        return b"" if self.chosen is None else self.chosen.eof()

    def tick(self, now: float, last_input: float | None = None) -> bytes:
        chosen = self.chosen
        if chosen is not None:
            return chosen.tick(now, last_input)
        if not self._buf or now - self._since < H2C_PREFACE_TIMEOUT:
            return b""
        # The preface (or the first head) did not complete in time: decide on what came, as
        # gunicorn does when its preface read times out; a head's timeout still counts from its
        # first byte.
        return self._decide(final=True)

    def receive(self, data: bytes) -> bytes:
        chosen = self.chosen
        if chosen is not None:
            return chosen.receive(data)
        if not self._buf:
            self._since = self.clock()
        self._buf += data
        return self._decide(final=False)

    # the decision --------------------------------------------------------------------------

    def _decide(self, final: bool) -> bytes:
        buf = self._buf
        factory = self.factory
        if self.prior:
            state = preface_match(buf)
            if state == PARTIAL and not final:
                return b""
            if state == MATCH:
                return self._choose(factory.h2(self.sock), buf)
            if factory.policy.mismatch_is_error:
                # Prior knowledge only: the peer is served HTTP/2 and nothing else, so it gets
                # HTTP/2 frames only: GOAWAY(PROTOCOL_ERROR), RFC 9113 §3.4 (not gunicorn's 400).
                h2 = factory.h2(self.sock)
                self.chosen = h2
                self._buf = b""
                return h2.refuse_preface()
        if self.upgrade:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if not final and len(buf) <= _UPGRADE_HEAD_MAX:
                    return b""
            else:
                head = buf[: end + 4]
                offer = self._upgrade_offer(head)
                if offer is not None:
                    rest = buf[end + 4 :]
                    if len(rest) < offer.body_length and not final:
                        return b""  # the upgrade request's body is still coming
                    if len(rest) >= offer.body_length:
                        h2 = factory.h2_upgraded(offer.settings, offer.head, self.sock, head)
                        self.chosen = h2
                        self._buf = b""
                        out = UPGRADE_101 + h2.start()
                        rest = rest[offer.body_length :]
                        return out + h2.receive(rest) if rest else out
        h1 = factory.h1(self.sock)
        h1.head_since = self._since  # the head began with the first byte, not with the choice
        return self._choose(h1, buf)

    def _upgrade_offer(self, head: bytes) -> Any:
        """The h2c upgrade this head asks for, if the HTTP/1 framer finds it a valid request."""
        offer = upgrade_request(head.lstrip(b"\r\n"))
        if offer is None:
            return None
        rules = self.factory.rules
        verdict = rules.cache.get(head)
        if verdict is None:
            verdict = rules.parse_and_cache(head)
        return None if verdict & _KIND_MASK in ERRORS else offer

    def _choose(self, protocol: Any, buf: bytes) -> bytes:
        self.chosen = protocol
        self._buf = b""
        return protocol.receive(buf) if buf else b""


class ProtocolFactory:
    """One worker's protocol constructors, for TLS (by ALPN) and for h2c (by first bytes)."""

    def __init__(self, shared: Any, policy: H2cPolicy, h2_config: Any, h2_answers: Any) -> None:
        # `shared`: the worker's connection.WorkerState (its rules and answers, the timeouts, the
        # partial-head budget HTTP/1 shares: `held`, `head_budget`, and the access log).
        self.shared = shared
        self.rules = shared.rules
        self.table = shared.responses.bytes_for
        self.head_timeout = shared.head_timeout
        self.body_timeout = shared.body_timeout
        self.policy = policy
        self.h2_config = h2_config
        self.h2_answers = h2_answers
        # With gunicorn's access log on, every answer is logged: the Logging* protocols of
        # access_log.py are built instead, chosen here once per connection.
        self.access = getattr(shared, "access_log", None)

    def h1(self, sock: Any = None) -> H1Protocol:
        """`sock`: the connection's socket, read for the client's address by the access log."""
        if self.access is not None:
            return access_log.LoggingH1Protocol(
                self.rules,
                self.table,
                self.head_timeout,
                self.body_timeout,
                self.access,
                sock,
                self.shared,
            )
        return H1Protocol(
            self.rules, self.table, self.head_timeout, self.body_timeout, budget=self.shared
        )

    def h2(self, sock: Any = None, tls: bool = False) -> H2Protocol:
        """`sock` as for h1; `tls`: HTTP/2 by ALPN (the access log's scheme), else h2c."""
        if self.access is not None:
            return access_log.LoggingH2Protocol(
                self.h2_config, self.rules, self.h2_answers, self.access, sock, tls
            )
        return H2Protocol(self.h2_config, self.rules, self.h2_answers)

    def h2_upgraded(
        self, settings: bytes, head: bool, sock: Any = None, request: bytes = b""
    ) -> H2Protocol:
        """`request`: the head of the `Upgrade: h2c` request (stream 1), for the access log."""
        if self.access is not None:
            proto = access_log.LoggingH2Protocol.upgraded(
                self.h2_config, self.rules, self.h2_answers, settings, head
            )
            proto.log_to(self.access, sock, False, request)  # type: ignore[attr-defined]
            return proto
        return H2Protocol.upgraded(self.h2_config, self.rules, self.h2_answers, settings, head)

    def for_alpn(self, alpn: str | None, sock: Any = None) -> Any:
        return self.h2(sock, tls=True) if alpn == "h2" else self.h1(sock)

    def negotiation(self, peer: Any, sock: Any = None) -> Negotiation | None:
        """The protocol for a plain connection from `peer`, or None when it gets no h2c (the
        worker's own Connection serves it)."""
        policy = self.policy
        prior = policy.prior_knowledge_allowed(peer)
        upgrade = policy.upgrade_allowed(peer)
        if not (prior or upgrade):
            return None
        return Negotiation(self, prior, upgrade, sock)
