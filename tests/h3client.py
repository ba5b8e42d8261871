"""An HTTP/3 client for the tests: aioquic's asyncio `connect` with its H3Connection.

`fetch(port, requests)` opens one QUIC connection to 127.0.0.1:port, sends every request at once
(each on its own stream) and returns their answers in order, within a time bound. aioquic's own
H3Connection checks a response's Content-Length against its DATA even when the request was HEAD,
whose answer carries the GET's Content-Length and no body (RFC 9110 §9.3.2): `HeadAwareH3` skips
that check for the streams that asked HEAD.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, BufferReadError
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived, StreamReset


class HeadAwareH3(H3Connection):
    """aioquic's H3Connection, with HEAD answers' Content-Length accepted (module docstring),
    and the server's GOAWAY read (aioquic's client drops it without an event)."""

    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self.head_streams: set[int] = set()
        self.control = b""  # the server's control stream (stream 3), as received

    @property
    def goaway(self) -> int | None:
        """The stream ID of the server's last GOAWAY, or None."""
        if not self.control:
            return None
        buf = Buffer(data=self.control)
        found = None
        buf.pull_uint_var()  # the stream type
        while not buf.eof():
            try:
                frame_type, size = buf.pull_uint_var(), buf.pull_uint_var()
                data = buf.pull_bytes(size)
            except BufferReadError:
                break  # a frame still partial
            if frame_type == 0x7:
                found = Buffer(data=data).pull_uint_var()
        return found

    def handle_event(self, event: Any) -> list[Any]:
        if isinstance(event, StreamDataReceived) and event.stream_id == 3:
            self.control += event.data  # aioquic delivers a stream's data in order
        return super().handle_event(event)

    def _check_content_length(self, stream: Any) -> None:
        if stream.stream_id in self.head_streams and stream.content_length == 0:
            return
        super()._check_content_length(stream)


@dataclass
class Answer:
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    @property
    def status(self) -> int:
        return int(dict(self.fields)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        return dict(self.fields).get(name)


@dataclass
class Request:
    method: bytes = b"GET"
    path: bytes = b"/"
    body: bytes = b""


class H3Protocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = HeadAwareH3(self._quic)
        self.answers: dict[int, Answer] = {}
        self.waiting: dict[int, asyncio.Future[Answer]] = {}

    def quic_event_received(self, event: Any) -> None:
        for h3_event in self.h3.handle_event(event):
            if not isinstance(h3_event, HeadersReceived | DataReceived):
                continue
            answer = self.answers.setdefault(h3_event.stream_id, Answer())
            if isinstance(h3_event, HeadersReceived):
                answer.fields = h3_event.headers
            else:
                answer.body += h3_event.data
            if h3_event.stream_ended:
                waiter = self.waiting.pop(h3_event.stream_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)

    def send(self, request: Request) -> asyncio.Future[Answer]:
        sid = self._quic.get_next_available_stream_id()
        fields = [
            (b":method", request.method),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", request.path),
        ]
        if request.body:
            fields.append((b"content-length", b"%d" % len(request.body)))
        if request.method == b"HEAD":
            self.h3.head_streams.add(sid)
        self.h3.send_headers(sid, fields, end_stream=not request.body)
        if request.body:
            self.h3.send_data(sid, request.body, end_stream=True)
        waiter: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.waiting[sid] = waiter
        self.transmit()
        return waiter


def configuration(cafile: str | None = None) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    if cafile:
        config.load_verify_locations(cafile)
        config.server_name = "localhost"
    else:
        config.verify_mode = ssl.CERT_NONE
    return config


async def fetch_async(
    port: int, requests: list[Request], cafile: str | None = None, timeout: float = 10.0
) -> list[Answer]:
    async with connect(
        "127.0.0.1",
        port,
        configuration=configuration(cafile),
        create_protocol=H3Protocol,
        wait_connected=True,
    ) as client:
        assert isinstance(client, H3Protocol)
        waiters = [client.send(request) for request in requests]
        return list(await asyncio.wait_for(asyncio.gather(*waiters), timeout))


def fetch(
    port: int, requests: list[Request], cafile: str | None = None, timeout: float = 10.0
) -> list[Answer]:
    """Every request on one connection, at once; the answers in order (TimeoutError if not
    all came within `timeout` seconds)."""
    return asyncio.run(asyncio.wait_for(fetch_async(port, requests, cafile, timeout), timeout + 5))


def is_vrypt(answer: Answer, head: bool = False) -> bool:
    return (
        answer.status == 200
        and answer.body == (b"" if head else b"Vrypt")
        and answer.header(b"content-length") == b"5"
        and answer.header(b"content-type") == b"text/plain"
    )


class SocketClient:
    """A blocking HTTP/3 client on a UDP socket of its own, driven by hand, that can move to a
    new local port mid-connection (`rebind`: what a NAT rebinding looks like to the server)."""

    def __init__(self, port: int, cafile: str | None = None) -> None:
        import socket

        self.socket_module = socket
        self.server = ("127.0.0.1", port)
        self.quic = QuicConnection(configuration=configuration(cafile))
        self.h3 = HeadAwareH3(self.quic)
        self.sock = self._new_socket()
        self.answers: dict[int, Answer] = {}
        self.ended: set[int] = set()
        self.quic.connect(self.server, self._now())
        self.connected = False
        self.terminated: ConnectionTerminated | None = None
        self.reset: set[int] = set()  # streams the server reset (refused after its GOAWAY)

    def _new_socket(self) -> Any:
        sock = self.socket_module.socket(self.socket_module.AF_INET, self.socket_module.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        return sock

    @staticmethod
    def _now() -> float:
        import time

        return time.monotonic()

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def rebind(self, new_connection_id: bool = False) -> None:
        """Continue from a new local port; with `new_connection_id`, also switch to another
        connection ID the server issued (a migration rather than a NAT rebinding)."""
        self.sock.close()
        self.sock = self._new_socket()
        if new_connection_id:
            self.quic.change_connection_id()

    def _transmit(self) -> None:
        for data, _addr in self.quic.datagrams_to_send(self._now()):
            self.sock.sendto(data, self.server)

    def _until(self, done: Any, timeout: float) -> None:
        deadline = self._now() + timeout
        self._transmit()
        while not done():
            now = self._now()
            if now >= deadline:
                raise TimeoutError("no answer from the server")
            timer = self.quic.get_timer()
            wait = min(deadline, timer if timer is not None else deadline) - now
            self.sock.settimeout(max(wait, 0.001))
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                if timer is not None and self._now() >= timer:
                    self.quic.handle_timer(self._now())
            else:
                self.quic.receive_datagram(data, addr, self._now())
            self._events()
            self._transmit()

    def _events(self) -> None:
        event = self.quic.next_event()
        while event is not None:
            if type(event).__name__ == "HandshakeCompleted":
                self.connected = True
            elif isinstance(event, ConnectionTerminated):
                self.terminated = event
            elif isinstance(event, StreamReset):
                self.reset.add(event.stream_id)
            for h3_event in self.h3.handle_event(event):
                if not isinstance(h3_event, HeadersReceived | DataReceived):
                    continue
                answer = self.answers.setdefault(h3_event.stream_id, Answer())
                if isinstance(h3_event, HeadersReceived):
                    answer.fields = h3_event.headers
                else:
                    answer.body += h3_event.data
                if h3_event.stream_ended:
                    self.ended.add(h3_event.stream_id)
            event = self.quic.next_event()

    def connect(self, timeout: float = 5.0) -> None:
        self._until(lambda: self.connected, timeout)

    def try_get(self, timeout: float = 5.0) -> Answer | None:
        """A GET, or None when the server refused it (reset after its GOAWAY) or closed the
        connection first: what a client retries on a new connection."""
        if self.terminated is not None or self.quic._close_event is not None:
            return None
        sid = self.quic.get_next_available_stream_id()
        self.h3.send_headers(
            sid,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", b"/"),
            ],
            end_stream=True,
        )
        self._until(
            lambda: (
                sid in self.ended
                or sid in self.reset
                or self.terminated is not None
                or self.quic._close_event is not None
            ),
            timeout,
        )
        return self.answers[sid] if sid in self.ended else None

    def get(self, method: bytes = b"GET", timeout: float = 5.0) -> Answer:
        sid = self.quic.get_next_available_stream_id()
        if method == b"HEAD":
            self.h3.head_streams.add(sid)
        self.h3.send_headers(
            sid,
            [
                (b":method", method),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", b"/"),
            ],
            end_stream=True,
        )
        self._until(lambda: sid in self.ended, timeout)
        return self.answers[sid]

    def wait_closed(self, timeout: float = 5.0) -> ConnectionTerminated:
        """Until the server closes the connection (after its closing period)."""
        self._until(lambda: self.terminated is not None, timeout)
        assert self.terminated is not None
        return self.terminated

    def close(self) -> None:
        self.quic.close()
        try:
            self._transmit()
        finally:
            self.sock.close()
