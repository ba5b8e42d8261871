"""A strict HTTP/2 client for the tests: the `h2` package's state machine over a real socket.

It records every event per stream, so a test can check that each stream got exactly one answer,
its headers, its body, and what GOAWAY or RST_STREAM the server sent.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class StreamResult:
    headers: list[tuple[bytes, bytes]] | None = None
    body: bytes = b""
    ended: bool = False
    reset: int | None = None  # the server's RST_STREAM error code
    responses: int = 0  # final (non-1xx) HEADERS blocks seen: must be 1

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers or ():
            if key == name:
                return value
        return None

    @property
    def status(self) -> int | None:
        value = self.header(b":status")
        return int(value) if value is not None else None


@dataclass
class H2Client:
    sock: socket.socket
    conn: h2.connection.H2Connection
    streams: dict[int, StreamResult] = field(default_factory=dict)
    goaway: h2.events.ConnectionTerminated | None = None
    closed: bool = False
    settings_acked: bool = False
    pings: list[bytes] = field(default_factory=list)

    @classmethod
    def connect(
        cls,
        port: int,
        *,
        sock: socket.socket | None = None,
        window: int | None = None,
        timeout: float = 5.0,
    ) -> H2Client:
        """Prior knowledge on a plain socket (or on `sock`, e.g. a TLS socket after ALPN h2)."""
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.settimeout(timeout)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        if window is not None:
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        client = cls(sock, conn)
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        body: bytes = b"",
        extra: list[tuple[str, str]] | None = None,
        end: bool = True,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (":method", method),
            (":scheme", "http"),
            (":authority", "127.0.0.1"),
            (":path", path),
            *(extra or []),
        ]
        self.conn.send_headers(stream_id, headers, end_stream=end and not body)
        if body:
            self._send_body(stream_id, body, end)
        self.streams[stream_id] = StreamResult()
        self.flush()
        return stream_id

    def _send_body(self, stream_id: int, body: bytes, end: bool) -> None:
        view = memoryview(body)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self.flush()
                self.receive_some()
                continue
            chunk = bytes(view[:window])
            view = view[window:]
            self.conn.send_data(stream_id, chunk, end_stream=end and not view)
        self.flush()

    def receive_some(self) -> bool:
        """One read, its events applied. False at EOF."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._apply(event)
        self.flush()
        return True

    def _apply(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            result = self.streams.setdefault(event.stream_id, StreamResult())
            result.headers = list(event.headers)
            result.responses += 1
        elif isinstance(event, h2.events.DataReceived):
            result = self.streams.setdefault(event.stream_id, StreamResult())
            result.body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.streams.setdefault(event.stream_id, StreamResult()).ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.streams.setdefault(event.stream_id, StreamResult()).reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.SettingsAcknowledged):
            self.settings_acked = True
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings.append(event.ping_data)

    def wait(self, stream_ids: list[int] | None = None, timeout: float = 5.0) -> None:
        """Until every stream named (default: all sent) ended or was reset, or the server
        closed the connection."""
        deadline = time.monotonic() + timeout
        wanted = stream_ids if stream_ids is not None else list(self.streams)
        while time.monotonic() < deadline:
            if all(
                self.streams[s].ended or self.streams[s].reset is not None for s in wanted
            ):
                return
            if not self.receive_some():
                return
        raise AssertionError(f"streams not answered within {timeout}s: {self.streams}")

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        self.sock.close()


def is_vrypt_h2(result: StreamResult, head: bool = False) -> bool:
    return (
        result.responses == 1
        and result.status == 200
        and result.ended
        and result.reset is None
        and result.header(b"content-length") == b"5"
        and result.header(b"content-type") == b"text/plain"
        and result.body == (b"" if head else b"Vrypt")
    )
