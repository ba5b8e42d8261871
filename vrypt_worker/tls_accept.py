"""The first read of a TLS connection, at its accept: the ClientHello that `TCP_DEFER_ACCEPT`
has already brought is answered before the connection ever waits in the event loop.

With deferred accepts the kernel hands a connection over once its first bytes have arrived; on a
TLS listener those are the ClientHello. Reading it at the accept, as plain.FirstRead does for an
HTTP/1 request, saves the loop a trip per connection: no readiness event to report and dispatch
for bytes known to be there, and the server's first flight (ServerHello to Finished) leaves one
iteration sooner. The connection is made and filed first (transport.SessionConnection), then
its read callback runs once, directly: whatever happens there (the flight sent, an alert and
the close, nothing read yet) is the connection's ordinary path, so nothing here duplicates it.
"""

from __future__ import annotations

import os
import socket
from _socket import socket as RawSocket
from collections.abc import Callable
from typing import Any

from vrypt_worker.connection import BaseConnection, WorkerState

# O_NONBLOCK is set on the descriptor once (os.set_blocking); with SOCK_NONBLOCK in the type the
# socket object agrees (timeout 0) without the ioctl setblocking makes (as plain.FirstRead).
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


class TLSFirstRead:
    """Called by the worker's accept loop with the descriptor accept4 gave it: `new` makes the
    connection (a SessionConnection with a fresh TLS session), `add` hands it to the worker."""

    __slots__ = ("add", "new", "state")

    def __init__(
        self,
        state: WorkerState,
        new: Callable[[WorkerState, Any], BaseConnection],
        add: Callable[[BaseConnection], None],
    ) -> None:
        self.state = state
        self.new = new
        self.add = add

    def read(self, fd: int, family: int) -> None:
        try:
            os.set_blocking(fd, False)
        except OSError:
            os.close(fd)
            return
        conn = self.new(self.state, RawSocket(family, _NONBLOCKING_STREAM, 0, fd))
        self.add(conn)  # filed before it reads: a close on that read is the ordinary close
        conn.on_readable()  # type: ignore[attr-defined]
