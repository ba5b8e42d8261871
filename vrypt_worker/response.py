"""The precomputed answers, one bytes object per answer kind, re-rendered once a second for Date.

The table is a list indexed by the framing kinds and updated in place, so a connection can hold on
to it and always send the current second's bytes without any per-request formatting. The answer to
a request (status, body, content type, extra header lines) is the operator's choice (answer.py,
`200 Vrypt` by default); the error answers are the server's own and do not change with it.
"""

from __future__ import annotations

from email.utils import formatdate

from vrypt_worker import framing
from vrypt_worker.answer import DEFAULT, Answer, active

BODY = DEFAULT.body

_STATUS = {
    framing.BAD_REQUEST: b"400 Bad Request",
    framing.URI_TOO_LONG: b"414 URI Too Long",
    framing.FIELDS_TOO_LARGE: b"431 Request Header Fields Too Large",
    framing.NOT_IMPLEMENTED: b"501 Not Implemented",
    framing.VERSION_NOT_SUPPORTED: b"505 HTTP Version Not Supported",
    framing.REQUEST_TIMEOUT: b"408 Request Timeout",
    framing.INTERNAL_ERROR: b"500 Internal Server Error",
}


def http_date(now: float) -> bytes:
    """IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`."""
    return formatdate(now, usegmt=True).encode("ascii")


def render(date: bytes, answer: Answer | None = None) -> list[bytes]:
    """Every answer for one value of the Date header, indexed by framing kind."""
    answer = answer or active()
    table = [b""] * framing.KINDS
    common = b"Server: vrypt\r\nDate: " + date + b"\r\nContent-Type: text/plain\r\n"
    # The default answer gives exactly the bytes it always had: status line, Server, Date,
    # Content-Type, Content-Length (then Connection when the framing asks for one).
    ok = answer.status_line + b"Server: vrypt\r\nDate: " + date + b"\r\n" + answer.fields
    body = answer.body
    for kind, connection in (
        (framing.OK, b""),
        (framing.OK_KEEP_ALIVE, b"Connection: keep-alive\r\n"),
        (framing.OK_CLOSE, b"Connection: close\r\n"),
    ):
        head = ok + connection + b"\r\n"
        table[kind] = head + body
        table[kind | framing.OK_HEAD] = head
    for kind, status in _STATUS.items():
        reason = status.split(b" ", 1)[1] + b"\n"
        table[kind] = (
            b"HTTP/1.1 "
            + status
            + b"\r\n"
            + common
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(reason)
            + reason
        )
    table[framing.CONTINUE] = b"HTTP/1.1 100 Continue\r\n\r\n"
    # CONNECT: a 2xx to it carries no Content-Length or Transfer-Encoding (RFC 9110 §9.3.6), so
    # the close ends the body and a client still reads it. Other statuses are answered as usual.
    length = b"Content-Length: %d\r\n" % len(body)
    if 200 <= answer.status < 300 and answer.fields.endswith(length):
        fields = answer.fields[: -len(length)]
        table[framing.TUNNEL] = (
            ok[: len(ok) - len(answer.fields)] + fields + b"Connection: close\r\n\r\n" + body
        )
    else:
        table[framing.TUNNEL] = table[framing.OK_CLOSE]
    return table


class ResponseTable:
    """The live table: `bytes_for[kind]`, with `refresh(now)` called by a once-a-second timer.
    It renders `answer`, by default the one VryptWorker.check_config chose in the arbiter."""

    __slots__ = ("_second", "answer", "bytes_for")

    def __init__(self, now: float, answer: Answer | None = None) -> None:
        self.answer = answer or active()
        self._second = int(now)
        self.bytes_for = render(http_date(self._second), self.answer)

    def refresh(self, now: float) -> bool:
        """Re-render when the second changed; returns whether it did."""
        second = int(now)
        if second == self._second:
            return False
        self._second = second
        self.bytes_for[:] = render(http_date(second), self.answer)
        return True
