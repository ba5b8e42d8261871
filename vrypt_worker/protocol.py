"""What a connection's plaintext protocol offers its transport: the seam between the I/O-free cores
(HTTP/1 framing in framing.py, HTTP/2 in h2/) and the code that moves bytes on the hub (a plain
socket, or TLS through tls.py).

The plain HTTP/1 path does not go through this seam: plain.Connection drives RequestFramer
itself, inlined, because a Python call per request is as much as the rest of the request costs.
Everything else (HTTP/1 inside TLS, HTTP/2 in cleartext or inside TLS) is a `PlaintextProtocol`
driven by one generic transport, so a transport knows nothing about HTTP and a protocol knows
nothing about sockets, clocks or the hub, and both can be tested byte by byte.
"""

from __future__ import annotations

from typing import Protocol


class PlaintextProtocol(Protocol):
    """One connection's HTTP state. The transport calls `receive` with every piece of plaintext
    the peer sent (never empty; EOF is `eof()`), writes what it returns, and stops reading while
    its own writes are blocked (back-pressure: a peer that does not read cannot grow our memory).

    - `closing`: the protocol wants no more input; the transport writes what it was given, then
      closes (half-closing and draining unread input first when `clean` is False, so that the
      last answer is not destroyed by a reset).
    - `idle()`: nothing in progress (no partial request, no open stream, nothing owed): the
      keep-alive timeout applies, and a draining worker may close it (after `shutdown()`).
    - `shutdown()`: graceful end (worker draining, max_requests reached): the bytes that announce
      it (HTTP/2 GOAWAY with the last stream id; b"" for HTTP/1, whose answers then say close).
      Requests that arrived before it are still answered.
    - `tick(now, last_input=None)`: from the worker's sweep, `now` from time.monotonic(): the
      protocol's own timeouts (HTTP/1's head and body, HTTP/2's stalled frames and idle rule, the
      h2c decision); returns bytes to send (a 408, a GOAWAY) or b"". The transport calls it every
      sweep while the protocol is not `idle()`, and otherwise only after input or when the
      keep-alive timeout is due: a timeout that counts from the last input takes `last_input`
      (the sweep after the last read), not the time of the call. Timed state must not assume a
      call per second (flood budgets refill by the seconds between calls).
    - `writable()`: the transport's blocked writes have all gone: bytes the protocol held back
      (flow control it could not yet satisfy, owed answers) may now go.
    """

    closing: bool
    clean: bool

    def receive(self, data: bytes) -> bytes: ...

    def eof(self) -> bytes: ...

    def idle(self) -> bool: ...

    def shutdown(self) -> bytes: ...

    def tick(self, now: float, last_input: float | None = None) -> bytes: ...

    def writable(self) -> bytes: ...
