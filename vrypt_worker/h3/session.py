"""One QUIC connection answering HTTP/3: aioquic's sans-I/O QuicConnection and H3Connection,
driven by the endpoint (endpoint.py) with datagrams and the clock, never with a socket.

Every request stream is answered with the chosen answer as soon as its HEADERS arrive (as nginx's
`return` does): the precomputed fields (answers.py), then the body in one DATA frame unless the
method is HEAD. A request body is read and dropped: aioquic hands it over as events and widens
the stream's and the connection's flow-control windows as it delivers them, so a client sending
a body of any size never stalls. A request aioquic's H3Connection finds malformed closes the
connection with its HTTP/3 error (H3_MESSAGE_ERROR and friends), as RFC 9114 §4.1.2 allows.

What the worker needs to know leaves through three plain attributes: `tally.answered` (the
worker's FramingRules: the RPS gauge and max_requests count one per answer), `issued` and
`retired` (connection IDs the endpoint must route here, or no longer), `terminated`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from aioquic.buffer import Buffer, encode_uint_var
from aioquic.h3.connection import ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
)
from aioquic.tls import Epoch

from vrypt_worker.h3.answers import H3Answers

# What aioquic's TLS layer writes its flights into, one per epoch: 16 KiB each, kept for the
# connection's life (aioquic 1.7), about half of an idle connection's Python heap.
_SHED = (Epoch.INITIAL, Epoch.HANDSHAKE, Epoch.ONE_RTT)


def shed_handshake_buffers(quic: QuicConnection) -> None:
    """Once the server's handshake is complete, its TLS layer writes nothing more (its last
    message, a session ticket, is written with the Finished it answers, and no ticket handler is
    set here; a later handshake message is an alert, raised, not written), and retransmissions
    come from the crypto streams, not these buffers: they are replaced with empty ones
    (docs/http3.md, "Memory")."""
    buffers = getattr(quic, "_crypto_buffers", None)
    if isinstance(buffers, dict):
        for epoch in _SHED:
            if epoch in buffers:
                buffers[epoch] = Buffer(capacity=0)


class SteeredQuicConnection(QuicConnection):
    """aioquic's QuicConnection, whose connection IDs begin with `prefix` (the worker's listener
    slot, two bytes), so that a classic BPF program on the UDP reuseport group (http3.py) steers
    every short-header packet to the slot's socket whatever the client's address: NAT rebinding
    and migration keep reaching the worker that holds the connection. The rest of each ID is
    random, as aioquic makes it. aioquic (1.7) makes IDs in its constructor and in
    `_replenish_connection_ids`, before any is sent: both are rewritten here, nothing else."""

    def __init__(self, *, prefix: bytes, **kwargs: Any) -> None:
        self.vrypt_prefix = prefix
        super().__init__(**kwargs)
        first = self._host_cids[0]
        first.cid = self.vrypt_cid(len(first.cid))
        self.host_cid = first.cid
        self._local_initial_source_connection_id = first.cid

    def vrypt_cid(self, length: int) -> bytes:
        prefix = self.vrypt_prefix
        return prefix + os.urandom(length - len(prefix))

    def _replenish_connection_ids(self) -> None:
        known = len(self._host_cids)
        super()._replenish_connection_ids()
        for entry in self._host_cids[known:]:
            entry.cid = self.vrypt_cid(len(entry.cid))


# What an access log seam is told per answer: (session, the request's fields, HEAD?).
Reporter = Callable[[Any, list[tuple[bytes, bytes]], bool], None]


class H3Session:
    """One QUIC connection of a worker (see the module docstring)."""

    __slots__ = (
        "answers",
        "cids",
        "closing",
        "deadline",
        "goaway_id",
        "h3",
        "issued",
        "next_request",
        "peer",
        "quic",
        "reporter",
        "retired",
        "tally",
        "terminated",
    )

    def __init__(
        self,
        configuration: QuicConfiguration,
        original_cid: bytes,
        answers: H3Answers,
        tally: Any,
        reporter: Reporter | None = None,
        retry_cid: bytes | None = None,
        cid_prefix: bytes = b"",
    ) -> None:
        if cid_prefix:
            self.quic: QuicConnection = SteeredQuicConnection(
                prefix=cid_prefix,
                configuration=configuration,
                original_destination_connection_id=original_cid,
                retry_source_connection_id=retry_cid,
            )
        else:
            self.quic = QuicConnection(
                configuration=configuration,
                original_destination_connection_id=original_cid,
                retry_source_connection_id=retry_cid,
            )
        self.h3 = H3Connection(self.quic)
        self.answers = answers
        self.tally = tally
        self.reporter = reporter
        self.peer: Any = None
        self.deadline: float | None = None  # the timer the endpoint has this session filed at
        self.cids: set[bytes] = {original_cid}  # every ID the endpoint routes here
        self.issued: list[bytes] = [self.quic.host_cid]
        self.retired: list[bytes] = []
        self.terminated = False
        self.next_request = 0  # the lowest request stream ID not seen yet
        self.goaway_id: int | None = None  # sent in a GOAWAY: later streams are refused
        self.closing = False

    @property
    def host_cid(self) -> bytes:
        return self.quic.host_cid

    # input ----------------------------------------------------------------------------------------

    def receive(self, data: bytes, addr: Any, now: float) -> None:
        self.peer = addr
        self.quic.receive_datagram(data, addr, now)
        self._process()

    def timer(self, now: float) -> None:
        self.quic.handle_timer(now)
        self._process()

    def _process(self) -> None:
        quic = self.quic
        h3 = self.h3
        event = quic.next_event()
        while event is not None:
            kind = type(event)
            if kind is ConnectionIdIssued:
                self.issued.append(event.connection_id)
            elif kind is ConnectionIdRetired:
                self.retired.append(event.connection_id)
            elif kind is ConnectionTerminated:
                self.terminated = True
            elif kind is HandshakeCompleted:
                shed_handshake_buffers(quic)
            else:
                for h3_event in h3.handle_event(event):
                    if type(h3_event) is HeadersReceived and h3_event.push_id is None:
                        self._answer(h3_event.stream_id, h3_event.headers)
                    # DataReceived: a request body, dropped (its window was widened already)
            event = quic.next_event()

    def _answer(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.goaway_id is not None and stream_id >= self.goaway_id:
            self._refuse(stream_id)  # sent after our GOAWAY: the client retries it elsewhere
            return
        if stream_id >= self.next_request:
            self.next_request = stream_id + 4
        method = b"GET"
        for name, value in headers:
            if name == b":method":
                method = value
                break
        answers = self.answers
        head = method == b"HEAD"
        body = b"" if head else answers.body
        fields = answers.tunnel if method == b"CONNECT" else answers.ok
        h3 = self.h3
        h3.send_headers(stream_id, fields, end_stream=not body)
        if body:
            h3.send_data(stream_id, body, end_stream=True)
        self.tally.answered += 1
        if self.reporter is not None:
            self.reporter(self, headers, head)

    def _refuse(self, stream_id: int) -> None:
        """H3_REQUEST_REJECTED (RFC 9114 §4.1.1): not processed, safe to retry."""
        try:
            self.quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_REJECTED)
            self.quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_REJECTED)
        except Exception:
            pass  # (a side already finished)

    # draining -------------------------------------------------------------------------------------

    def goaway(self) -> None:
        """Draining (RFC 9114 §5.2): GOAWAY naming the first request stream not processed.
        Every stream below it has been answered already (answers go out with the HEADERS)."""
        if self.goaway_id is not None:
            return
        self.goaway_id = self.next_request
        # aioquic (1.7) has no call for GOAWAY: the frame goes on its control stream.
        control = self.h3._local_control_stream_id
        if control is not None:
            frame = encode_frame(FrameType.GOAWAY, encode_uint_var(self.goaway_id))
            self.quic.send_stream_data(control, frame)

    def finished(self) -> bool:
        """After GOAWAY: the GOAWAY and every answer were acknowledged, and every request
        stream read to its end (aioquic forgets a stream only once both ways are done). A
        request sent before the client saw the GOAWAY arrives before its acknowledgement."""
        streams = self.quic._streams
        control = streams.get(self.h3._local_control_stream_id)  # type: ignore[arg-type]
        if control is not None:
            sender = control.sender  # acknowledged bytes leave its buffer (aioquic 1.7)
            if sender._buffer_start != sender._buffer_stop:
                return False
        return not any(stream_id % 4 == 0 for stream_id in streams)

    # output ---------------------------------------------------------------------------------------

    def datagrams(self, now: float) -> list[tuple[bytes, Any]]:
        return self.quic.datagrams_to_send(now)

    def next_timer(self) -> float | None:
        return self.quic.get_timer()

    def close(self, reason: str = "") -> None:
        """Close now (CONNECTION_CLOSE with H3_NO_ERROR); the endpoint drops it once aioquic
        reports it terminated (after the closing period, RFC 9000 §10.2)."""
        self.closing = True
        self.quic.close(error_code=ErrorCode.H3_NO_ERROR, reason_phrase=reason)
