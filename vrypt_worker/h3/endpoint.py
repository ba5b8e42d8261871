"""The QUIC connections of one worker, I/O-free: datagrams in, datagrams out, and one deadline.

The socket loop (quic.py) hands every datagram it reads to `feed(data, addr, now)` and, once per
readable event, sends what `flush(now)` returns; when the loop timer it keeps at
`next_deadline()` fires, it calls `expire(now)` and sends what `flush` returns again. Batching a
read's datagrams before the flush lets aioquic answer a burst with fewer packets (one ACK for
several).

Connections are keyed by every connection ID the server issued for them (aioquic's
ConnectionIdIssued / Retired events) and by the client's original destination ID until the
handshake moves off it, as RFC 9000 §5.2 routes packets. A datagram for an unknown connection ID
that is not a client Initial of at least 1200 bytes (§14.1) is dropped; a version the server does
not speak gets Version Negotiation (§6). Timers: one heap of (deadline, order, session) for the
whole worker; a session's entry is stale once its `deadline` moved, and is skipped.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from vrypt_worker.h3.answers import H3Answers
from vrypt_worker.h3.session import H3Session, Reporter

Datagram = tuple[bytes, Any]


def server_configuration(certfile: str, keyfile: str, idle_timeout: float) -> QuicConfiguration:
    """aioquic's server configuration from gunicorn's TLS files (read here, once, in the
    arbiter): ALPN `h3`, the idle timeout (gunicorn's keepalive)."""
    configuration = QuicConfiguration(
        is_client=False, alpn_protocols=H3_ALPN, idle_timeout=float(idle_timeout)
    )
    configuration.load_cert_chain(certfile, keyfile)
    return configuration


class H3Endpoint:
    """Every QUIC connection of one worker (see the module docstring)."""

    def __init__(
        self,
        configuration: QuicConfiguration,
        answers: H3Answers,
        tally: Any,
        reporter: Reporter | None = None,
        cid_prefix: bytes = b"",
        max_connections: int = 1 << 30,
    ) -> None:
        self.configuration = configuration
        self.cid_prefix = cid_prefix  # the worker's slot in every connection ID (BPF steering)
        self.answers = answers
        self.tally = tally
        self.reporter = reporter
        self.by_cid: dict[bytes, H3Session] = {}
        self.sessions: set[H3Session] = set()
        self.touched: set[H3Session] = set()
        self.stateless: list[Datagram] = []  # version negotiation, owed by no session
        self.timers: list[tuple[float, int, H3Session]] = []
        self.order = itertools.count()
        self.cid_length = configuration.connection_id_length
        self.versions = configuration.supported_versions
        self.accepting = True  # False once draining: no new connection is made
        # New connections are not made beyond this many (gunicorn's worker_connections): their
        # Initials are dropped, and the client tries again (a worker elsewhere, or later).
        self.max_connections = max_connections

    # input ----------------------------------------------------------------------------------------

    def feed(self, data: bytes, addr: Any, now: float) -> None:
        """One datagram from `addr`."""
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self.cid_length)
        except ValueError:
            return  # not QUIC
        session = self.by_cid.get(header.destination_cid)
        if session is None:
            version = header.version
            if version is None or header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
                return  # a short header for a connection we do not hold (a gone worker's)
            if version not in self.versions:
                self.stateless.append(
                    (
                        encode_quic_version_negotiation(
                            source_cid=header.destination_cid,
                            destination_cid=header.source_cid,
                            supported_versions=self.versions,
                        ),
                        addr,
                    )
                )
                return
            if (
                header.packet_type != QuicPacketType.INITIAL
                or len(data) < SMALLEST_MAX_DATAGRAM_SIZE
                or not self.accepting
                or len(self.sessions) >= self.max_connections
            ):
                return
            session = H3Session(
                self.configuration,
                header.destination_cid,
                self.answers,
                self.tally,
                self.reporter,
                cid_prefix=self.cid_prefix,
            )
            self.sessions.add(session)
            self.by_cid[header.destination_cid] = session
        session.receive(data, addr, now)
        self.touched.add(session)

    def expire(self, now: float) -> None:
        """The loop timer fired: every session whose timer is due handles it."""
        timers = self.timers
        while timers and timers[0][0] <= now:
            deadline, _, session = heapq.heappop(timers)
            if session.deadline == deadline and session in self.sessions:
                session.deadline = None
                session.timer(now)
                self.touched.add(session)

    # output ---------------------------------------------------------------------------------------

    def flush(self, now: float) -> list[Datagram]:
        """What the sessions touched since the last flush send, and their new timers."""
        out = self.stateless
        self.stateless = []
        touched = self.touched
        self.touched = set()
        for session in touched:
            out.extend(session.datagrams(now))
            # (aioquic forgets the streams that are done while it writes datagrams: look after)
            if not self.accepting and not session.closing and session.finished():
                session.close("draining")  # after GOAWAY, once every answer was acknowledged
                out.extend(session.datagrams(now))
            self._route(session)
            if session.terminated:
                self._forget(session)
                continue
            deadline = session.next_timer()
            if deadline != session.deadline:
                session.deadline = deadline
                if deadline is not None:
                    heapq.heappush(self.timers, (deadline, next(self.order), session))
        return out

    def next_deadline(self) -> float | None:
        """When `expire` must run next (stale heap entries are dropped on the way)."""
        timers = self.timers
        while timers:
            deadline, _, session = timers[0]
            if session.deadline == deadline and session in self.sessions:
                return deadline
            heapq.heappop(timers)
        return None

    # connections ----------------------------------------------------------------------------------

    def _route(self, session: H3Session) -> None:
        if session.issued:
            for cid in session.issued:
                self.by_cid[cid] = session
            session.cids.update(session.issued)
            session.issued.clear()
        if session.retired:
            for cid in session.retired:
                if self.by_cid.get(cid) is session:
                    del self.by_cid[cid]
                session.cids.discard(cid)
            session.retired.clear()

    def _forget(self, session: H3Session) -> None:
        self.sessions.discard(session)
        session.deadline = None
        for cid in session.cids:
            if self.by_cid.get(cid) is session:
                del self.by_cid[cid]

    def drain(self) -> None:
        """No new connection; GOAWAY on every open one, each closed once its answers are
        acknowledged (`flush`)."""
        self.accepting = False
        for session in self.sessions:
            session.goaway()
            self.touched.add(session)

    def close_all(self, reason: str = "") -> None:
        """Close every connection now (CONNECTION_CLOSE); `flush` sends the closes."""
        for session in self.sessions:
            if not session.closing:
                session.close(reason)
                self.touched.add(session)

    def busy(self) -> bool:
        """A connection is open and not closing."""
        return any(not session.closing for session in self.sessions)

    def __len__(self) -> int:
        return len(self.sessions)
