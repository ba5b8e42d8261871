"""Framing candidates side by side: cost per request and what each accepts or rejects.

    python -m bench.framing_candidates          (needs the `bench` extra: httptools, gunicorn-h1c)

Each candidate must find where every request ends and whether it is HEAD / keep-alive. Costs are
the minimum over repeats of a timed loop (the least disturbed run on a shared machine), in
microseconds per request, for one request per read and for 16 pipelined requests per read.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from vrypt_worker.framing import ERRORS, FramingRules, RequestFramer

WRK_GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
BROWSER_GET = (
    b"GET /static/app.js?v=3 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Mozilla/5.0\r\n"
    b"Accept: */*\r\nAccept-Language: en\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Cookie: a=b; c=d\r\nConnection: keep-alive\r\n\r\n"
)
CASES = {
    "GET": WRK_GET,
    "FOO method": b"FOO / HTTP/1.1\r\n\r\n",
    "HTTP/1.0": b"GET / HTTP/1.0\r\n\r\n",
    "chunked body": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "CL + TE": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "CL, CL differ": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "bare LF": b"GET / HTTP/1.1\nHost: x\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "TLS ClientHello": bytes.fromhex("16030100f4010000f00303") + bytes(32),
}


class Candidate:
    name = ""

    def feed(self, data: bytes) -> int:
        """Complete requests found (-1 when the candidate rejects the input)."""
        raise NotImplementedError


class Vrypt(Candidate):
    name = "vrypt_worker.framing (own, head cache)"

    def __init__(self, cold: bool = False) -> None:
        self.rules = FramingRules()
        self.framer = RequestFramer(self.rules)
        self.cold = cold
        if cold:
            self.name = "vrypt_worker.framing, cache cleared each read"

    def feed(self, data: bytes) -> int:
        if self.cold:
            self.rules.cache.clear()
        out = self.framer.feed(data)
        if self.framer.closed:
            if out and out[-1] in ERRORS:
                return -1
            self.framer = RequestFramer(self.rules)
        return len(out)


class Httptools(Candidate):
    name = "httptools (llhttp)"

    def __init__(self) -> None:
        import httptools

        self.errors = (httptools.HttpParserError,)
        self.count = 0
        self.parser = httptools.HttpRequestParser(self)
        self.module = httptools

    def on_message_complete(self) -> None:
        self.count += 1

    def feed(self, data: bytes) -> int:
        self.count = 0
        try:
            self.parser.feed_data(data)
        except self.errors:
            self.parser = self.module.HttpRequestParser(self)
            return -1
        return self.count


class H1CProtocol(Candidate):
    name = "gunicorn-h1c H1CProtocol (picohttpparser)"

    def __init__(self) -> None:
        from gunicorn_h1c import H1CProtocol as Protocol

        self.count = 0
        self.protocol_class = Protocol
        self.parser = self._new()

    def _new(self):  # type: ignore[no-untyped-def]
        return self.protocol_class(on_message_complete=self._done)

    def _done(self) -> None:
        self.count += 1

    def feed(self, data: bytes) -> int:
        self.count = 0
        try:
            self.parser.feed(data)
        except Exception:
            self.parser = self._new()
            return -1
        return self.count


class H1CFast(Candidate):
    name = "gunicorn-h1c parse_request_fast (heads only)"

    def __init__(self) -> None:
        from gunicorn_h1c import parse_request_fast

        self.parse = parse_request_fast

    def feed(self, data: bytes) -> int:
        count = 0
        pos = 0
        try:
            while pos < len(data):
                request = self.parse(data[pos:])
                pos += request.consumed if hasattr(request, "consumed") else len(data)
                count += 1
        except Exception:
            return -1
        return count


def cost(feed: Callable[[bytes], int], data: bytes, per_read: int) -> float:
    number = max(1, 20000 // per_read)
    best = min(timeit.repeat(lambda: feed(data), number=number, repeat=7))
    return best / number / per_read * 1e6


def main() -> None:
    makers: list[Callable[[], Candidate]] = [
        Vrypt,
        lambda: Vrypt(cold=True),
        Httptools,
        H1CProtocol,
        H1CFast,
    ]
    print("| candidate | wrk GET, 1/read | wrk GET, 16/read | browser GET, 1/read |")
    print("|---|---|---|---|")
    for make in makers:
        candidate = make()
        cells = [
            cost(candidate.feed, WRK_GET, 1),
            cost(candidate.feed, WRK_GET * 16, 16),
            cost(candidate.feed, BROWSER_GET, 1),
        ]
        print(f"| {candidate.name} | " + " | ".join(f"{c:.2f} µs" for c in cells) + " |")
    print()
    names = list(CASES)
    print("| candidate | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for make in makers[:1] + makers[2:]:
        candidate = make()
        row = []
        for case in names:
            found = make().feed(CASES[case])
            row.append("reject" if found < 0 else f"{found} req")
        print(f"| {candidate.name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
