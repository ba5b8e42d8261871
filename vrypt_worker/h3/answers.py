"""The answer's HTTP/3 form: its field list, re-rendered once a second for Date, as response.py
and h2/answers.py do for HTTP/1 and HTTP/2.

The fields are those of the HTTP/2 answer (`:status`, `server`, `date`, `content-type`, the
operator's extra fields lowercased, `content-length`), without connection-specific fields
(RFC 9114 §4.2). QPACK encodes them per connection (aioquic's encoder): the list is what is
precomputed here.
"""

from __future__ import annotations

from vrypt_worker.answer import NO_CONTENT, Answer, active
from vrypt_worker.response import http_date

Fields = list[tuple[bytes, bytes]]

_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)


def fields(answer: Answer, date: bytes, content_length: bool = True) -> Fields:
    """The answer's field list for one Date value."""
    out: Fields = [(b":status", b"%d" % answer.status), (b"server", b"vrypt"), (b"date", date)]
    if answer.content_type is not None:
        out.append((b"content-type", answer.content_type))
    for line in answer.headers:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name not in _CONNECTION_SPECIFIC:
            out.append((name, value.strip(b" \t")))
    if content_length and answer.status not in NO_CONTENT:
        out.append((b"content-length", b"%d" % len(answer.body)))
    return out


class H3Answers:
    """One worker's live HTTP/3 answer: `ok` (the operator's answer), `tunnel` (the same to a
    CONNECT, without Content-Length for a 2xx: RFC 9110 §9.3.6) and `body`. `refresh(now)`
    once a second renders the Date again; sessions hold this object, never its lists."""

    __slots__ = ("_second", "answer", "body", "ok", "tunnel")

    def __init__(self, now: float, answer: Answer | None = None) -> None:
        self.answer = answer or active()
        self.body = self.answer.body
        self._second = -1
        self.ok: Fields = []
        self.tunnel: Fields = []
        self.refresh(now)

    def refresh(self, now: float) -> bool:
        second = int(now)
        if second == self._second:
            return False
        self._second = second
        date = http_date(second)
        self.ok = fields(self.answer, date)
        self.tunnel = (
            fields(self.answer, date, content_length=False)
            if 200 <= self.answer.status < 300
            else self.ok
        )
        return True
