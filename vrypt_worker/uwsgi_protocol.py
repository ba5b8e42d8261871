"""uwsgi as a `PlaintextProtocol` (protocol.py): what a connection serves when gunicorn's
`protocol` is `uwsgi` (nginx's `uwsgi_pass`), on a plain socket or inside TLS (nginx's
`suwsgi://`), behind transport.SessionConnection.

Every packet is answered with the chosen answer as an HTTP/1.1 response, which is what nginx's
uwsgi module reads back (its status line, fields, and Content-Length to know where the body ends):
the worker's own response table, so the answer, its Date and the access log's view of it are the
HTTP path's. A refused packet, and every connection from a peer outside `uwsgi_allow_ips`, gets
`500 Internal Server Error` and the close, as gunicorn's WSGI workers answer them
(uwsgi_framing.py says which and why).

Timeouts: a packet whose header or vars do not complete within the head timeout, or whose body
stops for the body timeout, closes the connection without an answer, as gunicorn's gevent worker
does when its keep-alive timeout runs out in the middle of a packet. The partial-packet budget
is HTTP/1's (`VRYPT_HEAD_BUFFER`, h1_protocol.py): a partial packet past framing.SMALL_HEAD is
held only while the worker's partial heads and packets stay within it, else it is refused.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

from vrypt_worker.framing import BATCH, SMALL_HEAD
from vrypt_worker.owed import OwedAnswers
from vrypt_worker.uwsgi_framing import REFUSED, PacketFramer, PacketRules

_KNOWN_ADDRESSES = 4096


class AllowList:
    """`uwsgi_allow_ips`: the peers whose packets are served. `*` allows every peer; a peer
    that is not an IP address (a Unix socket) is always allowed, as in gunicorn. Entries are
    addresses or networks (gunicorn's validator accepts both; gunicorn 27.0.1 itself compares
    the peer's address with each entry as a string, so a network never matches there). An
    IPv4-mapped IPv6 peer (`::ffff:127.0.0.1`, a dual-stack listener) is its IPv4 address."""

    __slots__ = ("allow_all", "known", "networks")

    def __init__(self, entries: list[str]) -> None:
        self.allow_all = "*" in entries
        self.networks = tuple(ipaddress.ip_network(e) for e in entries if e != "*")
        # Decisions by address: `ipaddress` takes microseconds per address, and a front end
        # connects from the same few addresses again and again.
        self.known: dict[str, bool] = {}

    def allows(self, peer: Any) -> bool:
        if self.allow_all or not isinstance(peer, tuple):
            return True
        known = self.known.get(peer[0])
        if known is None:
            if len(self.known) >= _KNOWN_ADDRESSES:
                self.known.clear()
            known = self.known[peer[0]] = self.decide(peer[0])
        return known

    def decide(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(str(address).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


class UwsgiProtocol(OwedAnswers):
    """One connection's uwsgi state, I/O-free (module docstring)."""

    __slots__ = (
        "body_since",
        "body_timeout",
        "budget",
        "clean",
        "clock",
        "closing",
        "fed",
        "framer",
        "head_since",
        "head_timeout",
        "held",
        "owed",
        "report",
        "table",
    )

    def __init__(
        self,
        packets: PacketRules,
        table: list[bytes],
        head_timeout: float,
        body_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        budget: Any = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.framer = PacketFramer(packets)
        self.report = report  # told why, whenever a packet is refused (the error log)
        self.table = table  # the worker's live response table (updated in place each second)
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.clock = clock
        self.budget = budget  # the worker: `held` and `head_budget` (None: no budget)
        self.held = 0  # partial bytes counted in budget.held
        self.closing = False
        self.clean = False
        self.owed: list[int] = []  # answer kinds beyond the batch already given
        self.head_since = 0.0  # when the current partial packet began (clock), or 0
        self.fed = False  # input since the last tick (for the body timeout)
        self.body_since = 0.0

    def answers(self, out: list[int]) -> bytes:
        """The bytes of the answers `out` owes (BATCH at a time; the rest wait in `owed`)."""
        if len(out) > BATCH:
            self.owed.extend(out[BATCH:])
            out = out[:BATCH]
        return self.render(out)

    def receive(self, data: bytes) -> bytes:
        framer = self.framer
        if self.closing or framer.closed:
            return b""  # input after the final answer is dropped
        self.fed = True
        out = self.feed(data)
        payload = self.answers(out) if out else b""
        if framer.in_packet:
            if out or not self.head_since:  # a new packet began in this read
                self.head_since = self.clock()
        else:
            self.head_since = 0.0
        if self.budget is not None and (self.held or framer.buffered):
            payload += self.account()
        if framer.closed:
            if framer.reason and self.report is not None:
                self.report(framer.reason)
            if not self.owed:
                self.closing = True
                self.clean = framer.clean
        return payload

    def feed(self, data: bytes) -> list[int]:
        """The framer's answers to one read (the access log's subclass records their packets)."""
        return self.framer.feed(data)

    def refuse(self, reason: str) -> bytes:
        """The 500 and the close, now (a peer outside uwsgi_allow_ips; a partial packet past the
        budget), after any answers still owed. (Not reported: the caller says why.)"""
        self.release()
        kind = self.framer.refuse(reason)[0]
        self.head_since = 0.0
        self.clean = False
        if self.owed:
            self.owed.append(kind)
            return b""
        self.closing = True
        return self.table[REFUSED]

    def account(self) -> bytes:
        """Off the hot path: the partial packet's bytes in the worker's budget; a big one past
        it is refused (returned)."""
        budget = self.budget
        held = self.framer.buffered
        if held > SMALL_HEAD and budget.held + held - self.held > budget.head_budget:
            return self.refuse("partial packets past VRYPT_HEAD_BUFFER")
        budget.held += held - self.held
        self.held = held
        return b""

    def eof(self) -> bytes:
        """The peer closed: a packet cut short gets the 500 (it may still read it)."""
        self.head_since = 0.0
        if self.closing or self.owed:
            self.closing = True
            return b""
        framer = self.framer
        out = framer.eof()
        self.closing = True
        if not out:
            return b""
        if self.report is not None:
            self.report(framer.reason)
        return self.table[REFUSED]

    def forbid(self, reason: str) -> None:
        """The peer may not send packets: its first input (or its end) gets the 500."""
        self.framer.forbid(reason)

    def idle(self) -> bool:
        return self.framer.idle and not self.owed and not self.closing

    def shutdown(self) -> bytes:
        # Nothing to announce: the worker's rules make every answer from now on say close.
        return b""

    def tick(self, now: float, last_input: float | None = None) -> bytes:
        """The head and body timeouts: the connection closes without an answer (`closing`)."""
        framer = self.framer
        if self.closing or framer.closed:
            return b""
        if self.head_since:
            if now - self.head_since >= self.head_timeout:
                self.expire()
        elif not framer.idle:  # between two reads of a body
            if self.fed:
                self.fed = False
                self.body_since = now if last_input is None else last_input
            if now - self.body_since >= self.body_timeout:
                self.expire()
        return b""

    def expire(self) -> None:
        self.release()
        self.framer.finish()
        self.head_since = 0.0
        self.owed.clear()
        self.closing = True
        self.clean = False
