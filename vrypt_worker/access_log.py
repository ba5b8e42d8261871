"""gunicorn's access log for VryptWorker: `accesslog`, `access_log_format`, `logconfig*`.

Selected once, at worker start, when gunicorn's logger says the access log is on
(`Logger.access_log_enabled`): the worker then accepts `LoggingConnection`s instead of
`Connection`s, and its protocol factory (protocols.py) builds `LoggingH1Protocol` (HTTP/1 in TLS
or on an h2c port) and `LoggingH2Protocol` (every HTTP/2 stream: h2c, upgrade, TLS) instead of
their originals.

HTTP/1 reaches the log through one seam, `AccessLog.answered` / `framed` / `refused` (and
`accepted`, for an answer given at the accept, plain.FirstRead): each path reports the head it
answered, the answer kind and when the read began, and the lines are built in access_lines.py
only. The
HTTP/1 classes below are thin layers that call the originals: the framer records the heads it
finds when given a list (RequestFramer.feed; off, one test per new head), and the only copied
code is the keep-alive branch of Connection.on_readable (LoggingConnection says why).

HTTP/2 reaches it through one slot of `H2Protocol`, `_report`: None with the log off (its test
is folded into a comparison the hot path makes anyway), `LoggingH2Protocol._log_hot` with it on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vrypt_worker.access_lines import (
    H2_HEAD,
    H2_OK,
    H2_TOO_LARGE,
    H2_TUNNEL,
    H2_URI_TOO_LONG,
    AccessLog,
    Client,
    H2Request,
    escape,
)
from vrypt_worker.framing import CLOSING, CONTINUE, OK, FramingRules, RequestFramer
from vrypt_worker.h1_protocol import H1Protocol
from vrypt_worker.h2.answers import H2Answers, Variant
from vrypt_worker.h2.connection import H2Config, H2Protocol
from vrypt_worker.plain import Connection


class LoggingFramer(RequestFramer):
    """A RequestFramer that reports every answer it gives, with the head it answers.

    The framing is the base class's own `feed` (not a copy): given a list, it records each head
    it finds with the index of its first answer (RequestFramer.feed). Here those records become
    `heads`, one per answer in step with `out` (None for an interim 100), and the answers go to
    the access log (`AccessLog.framed`) at once, before the connection sends them or anything
    else can feed the worker's shared `out`. `body_head` is the head of a request whose body is
    still arriving: the head of an answer that a later read completes."""

    __slots__ = ("access", "body_head", "client", "heads", "records")

    def __init__(
        self,
        rules: FramingRules,
        heads: list[bytes | None],
        access: AccessLog | None = None,
        client: Client | None = None,
    ) -> None:
        super().__init__(rules)
        self.heads = heads  # (shared by a worker's framers: read it before the next feed)
        self.records: list[tuple[int, bytes]] = []
        self.body_head = b""
        self.access = access
        self.client = client

    def feed(self, data: bytes, heads: list[tuple[int, bytes]] | None = None) -> list[int]:
        """RequestFramer.feed, reported (`heads` is ignored: this framer records its own)."""
        client = self.client
        if client is not None:
            client.fed = True
        records = self.records
        out = RequestFramer.feed(self, data, records)
        answered = self.heads
        answered.clear()
        if out:
            head = self.body_head
            count = len(records)
            at = 0
            for index, kind in enumerate(out):
                while at < count and records[at][0] <= index:
                    head = records[at][1]
                    at += 1
                answered.append(None if kind == CONTINUE else head)
            if self.access is not None:
                self.access.framed(client, out, answered)
        if records:
            self.body_head = records[-1][1]  # (kept only while a body follows it)
            records.clear()
        return out

    def request_head(self) -> bytes:
        """The head of the request in progress, for the server's own 408 or 431: what a head
        still arriving has sent, or the head of a body still arriving."""
        return self.partial_head() if self.in_head else self.body_head


class LoggingConnection(Connection):
    """A Connection that reports every answer it gives to the access log.

    Everything but the keep-alive read is Connection's own code: the framer reports what it
    answers (LoggingFramer), `frame` reports the pipelined copies it answers without a framer,
    `refuse` the server's own 408 and 431. `on_readable` is the one copy: the read and the
    branch that answers a read that is exactly one cached keep-alive head, plus the report; a
    call around Connection's could not see the head it answered (docs/performance.md, "Access
    log", has the figures). Every other read goes to `frame`, a cached `Connection: close`
    head included (answered by the framer, as Connection.answer_and_close would)."""

    __slots__ = ("access", "client")

    def __init__(self, state: Any, sock: Any) -> None:
        super().__init__(state, sock)
        self.access: AccessLog = state.access_log
        self.client = Client.of(sock)

    def new_framer(self) -> RequestFramer:
        return LoggingFramer(self.rules, self.access.heads, self.access, self.client)

    def on_readable(self) -> None:
        access = self.access
        start = time.perf_counter() if access.timed else 0.0
        try:
            data = self.sock.recv(self.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        rules = self.rules
        self.seen = rules.tick
        if self.framer is None:  # Connection.on_readable's keep-alive branch, and the report
            if data == rules.recent_head:
                kind = rules.recent_kind
            else:
                kind = rules.cache.get(data, CLOSING)
                if kind < CLOSING:
                    rules.recent_head = data
                    rules.recent_kind = kind
            if kind < CLOSING and rules.answered < rules.open_until:
                rules.answered += 1
                payload = self.table[kind]
                try:
                    sent = self.sock.send(payload)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self.close()
                    return
                # The line of the last answer, again (AccessLog.answered says when it may be):
                # probed here, since a call costs about as much as the rest of the request's log.
                client = self.client
                if (
                    data == access.line_head
                    and kind == access.line_kind
                    and client.log_addr == access.line_addr
                ):
                    access.lines.append(access.last_line)
                else:
                    access.answered(client, data, kind, start)
                if sent != len(payload):
                    self.wait_writable(payload[sent:])
                return
        self.client.log_start = start
        self.frame(data)

    __call__ = on_readable

    def frame(self, data: bytes) -> None:
        if self.framer is not None:  # the framer reports what it answers
            Connection.frame(self, data)
            return
        rules = self.rules
        answered = rules.answered
        client = self.client
        client.fed = False
        Connection.frame(self, data)
        if not client.fed and rules.answered != answered:
            # Answered without a framer: pipelined copies of one head (FramingRules.copies).
            self.access.answered(
                client, rules.recent_head, rules.recent_kind, client.log_start,
                rules.answered - answered,
            )  # fmt: skip

    def refuse(self, kind: int) -> None:
        framer = self.framer
        head = framer.request_head() if isinstance(framer, LoggingFramer) else b""
        self.access.refused(self.client, head, kind)
        super().refuse(kind)


class LoggingH1Protocol(H1Protocol):
    """An H1Protocol (HTTP/1.1 inside TLS or on an h2c port) that reports every answer it gives.

    A call around H1Protocol.receive: its framer reports what it answers (LoggingFramer); an
    answer given without the framer is the keep-alive shortcut (FramingRules' hot-path
    contract), recognised after the call: the framer was fresh, an answer could keep the
    connection open, and the read is now `rules.recent_head`, which only that shortcut sets.
    `refuse` reports the server's own 408 and 431. `peer` is the connection's socket (the
    client's address and port); `heads` is no longer used (kept for ProtocolFactory.h1)."""

    __slots__ = ("access", "client")
    close_shortcut = False  # every head goes through the LoggingFramer, which reports it

    def __init__(
        self,
        rules: FramingRules,
        table: list[bytes],
        head_timeout: float,
        body_timeout: float,
        access: AccessLog,
        peer: Any = None,
        budget: Any = None,
    ) -> None:
        super().__init__(rules, table, head_timeout, body_timeout, budget=budget)
        self.access = access
        self.client = Client.of(peer)
        self.framer = LoggingFramer(rules, access.heads, access, self.client)

    def receive(self, data: bytes) -> bytes:
        access = self.access
        client = self.client
        start = client.log_start = time.perf_counter() if access.timed else 0.0
        rules = self.rules
        shortcut = self.framer.fresh and rules.answered < rules.open_until
        payload = H1Protocol.receive(self, data)
        if shortcut and data == rules.recent_head:
            access.answered(client, data, rules.recent_kind, start)
        return payload

    def refuse(self, kind: int) -> bytes:
        self.access.refused(self.client, self.framer.request_head(), kind)  # type: ignore[attr-defined]
        return super().refuse(kind)


class LoggingH2Protocol(H2Protocol):
    """An H2Protocol (HTTP/2 by ALPN or h2c, h2/connection.py) that logs every stream it answers.

    Chosen once per connection by cleartext.ProtocolFactory when the log is on, so the HTTP/2 core
    stays unaware of logging and its hot path as it is. Two ways in, as in the core:
    - the core's seam `_report` (here `_log_hot`), called by its hot path for every stream it
      answers (None in the core: nothing per answer with the log off): the stream is
      logged with the template cached for (HPACK table state, header block, verdict), shared by
      every connection whose client sends the same blocks (the core shares table states alike).
    - the general path (bodies, CONTINUATION, 431/414, CONNECT, trailers, the upgraded stream 1)
      goes through methods the core already has: `_decode_request` keeps the request's log
      record (its block decoded in full from the table state before it, the atoms cached) for
      the stream being opened, `_answer` logs it with the answer chosen. A stream that ends
      without an answer (reset, refused, malformed) logs nothing, as gunicorn logs only
      responses.
    `peer` is the connection's socket (the client's address and port); `tls` gives the scheme."""

    __slots__ = (
        "_log_requests",
        "_log_sid",
        "_log_start",
        "_log_templates",
        "_log_tls",
        "access",
        "log_addr",
        "log_port",
    )

    def __init__(
        self,
        config: H2Config,
        rules: FramingRules,
        answers: H2Answers,
        access: AccessLog | None = None,
        peer: Any = None,
        tls: bool = False,
    ) -> None:
        super().__init__(config, rules, answers)
        self._report = LoggingH2Protocol._log_hot  # the core's seam (a function: no cycle)
        self._log_requests: dict[int, H2Request] = {}  # streams opened, not yet answered
        self._log_sid = 0  # the stream whose header block is being decoded
        self._log_start = time.perf_counter()
        if access is not None:
            self.log_to(access, peer, tls)

    def log_to(self, access: AccessLog, peer: Any, tls: bool, upgrade: bytes = b"") -> None:
        """Where this connection's lines go (`H2Protocol.upgraded` builds the protocol without
        it); `upgrade`: the head of the `Upgrade: h2c` request that is stream 1."""
        self.access = access
        if access.timed:  # the format asks for a duration: a clock read per call, not per line
            self.__class__ = _TimedLoggingH2Protocol
        self._log_tls = tls
        self._log_templates = access.h2_templates[tls]
        try:
            name = peer.getpeername() if peer is not None else None
        except OSError:
            name = None
        if isinstance(name, tuple):
            self.log_addr = escape(str(name[0]).encode("latin-1", "replace"))
            self.log_port = str(name[1])
        else:
            self.log_addr = "-"
            self.log_port = "-"
        if upgrade:
            self._log_requests[1] = access.h2_upgrade_request(upgrade)

    def _log_template(self, block: bytes, kind: int) -> str:
        """The hot path's template for a block the table state decodes without inserting."""
        access = self.access
        request = access.h2_request(self._table, block, self._log_tls)
        return access.h2_template(request, kind, self.answers, self._log_tls)

    def _log_hot(self, block: bytes, verdict: int) -> None:
        """The core's seam (`_report`): the hot path answered a stream whose header block
        `block` the table state decodes, without inserting, to `verdict` (the kind: H2_OK,
        H2_HEAD)."""
        access = self.access
        template = self._log_templates.get((self._table.key, block, verdict))
        if template is None:
            template = self._log_template(block, verdict)
        if template is access.line_template and self.log_addr == access.line_addr:
            access.lines.append(access.last_line)  # same block, same address, same second
        else:
            access.lines.append(access.fresh_line(self, template, self._log_start))

    def _header_block(self, sid: int, flags: int, block: bytes, bad_priority: bool) -> None:
        if sid <= self._last_id:  # trailers, or a closed stream: no request is opened
            super()._header_block(sid, flags, block, bad_priority)
            return
        self._log_sid = sid
        try:
            super()._header_block(sid, flags, block, bad_priority)
        finally:
            self._log_sid = 0
        requests = self._log_requests
        streams = self._streams
        if sid not in streams:
            requests.pop(sid, None)  # answered, reset, or ignored after GOAWAY
        if len(requests) > len(streams):  # streams reset since they opened: forget them
            for gone in [key for key in requests if key not in streams]:
                del requests[gone]

    def _decode_request(self, block: bytes) -> int:
        table = self._table
        verdict = super()._decode_request(block)
        if self._log_sid:
            self._log_requests[self._log_sid] = self.access.h2_request(table, block, self._log_tls)
        return verdict

    def _answer(self, sid: int, variant: Variant, head: bool, stream: Any) -> None:
        request = self._log_requests.pop(sid, None)
        if request is not None:  # None: the hot path, which logged the stream itself
            answers = self.answers
            if variant is answers.ok:
                kind = H2_HEAD if head else H2_OK
            elif variant is answers.too_large:
                kind = H2_TOO_LARGE
            elif variant is answers.uri_too_long:
                kind = H2_URI_TOO_LONG
            else:
                kind = H2_TUNNEL
            access = self.access
            template = access.h2_template(request, kind, answers, self._log_tls)
            access.lines.append(access.fresh_line(self, template, self._log_start))
        super()._answer(sid, variant, head, stream)


class _TimedLoggingH2Protocol(LoggingH2Protocol):
    """A LoggingH2Protocol whose format has a duration (T D M L): the time each call began,
    which its lines measure from. A class of its own (`log_to` switches to it), so that the
    other formats pay no wrapper per call."""

    __slots__ = ()

    def receive(self, data: bytes) -> bytes:
        self._log_start = time.perf_counter()
        return super().receive(data)

    def writable(self) -> bytes:
        # frames a call left unparsed (the call's answers were used up) are answered here
        self._log_start = time.perf_counter()
        return super().writable()


def start(worker: Any) -> AccessLog | None:
    """At worker start: the access log if gunicorn's logger has it on, else None (and nothing
    on the request path changes)."""
    log = worker.log
    enabled = getattr(log, "access_log_enabled", None)
    if enabled is None:
        cfg = worker.cfg
        enabled = bool(cfg.accesslog or cfg.logconfig or cfg.logconfig_dict)
    access_logger = getattr(log, "access_log", None)
    if not enabled or access_logger is None or not access_logger.isEnabledFor(logging.INFO):
        return None
    access = AccessLog(worker)
    try:  # a format that cannot be rendered: said once here, not per request
        access.template(b"GET / HTTP/1.1\r\n\r\n", OK)
    except Exception as exc:
        access.close()
        log.error(
            "access log off: access_log_format %r cannot be rendered (%r)", access.format, exc
        )
        return None
    worker.access_log = access
    worker.connection_class = LoggingConnection
    turn = worker.loop.prepare()
    turn.start(access.turn)
    access.watcher = turn
    return access


__all__ = [
    "AccessLog",
    "LoggingConnection",
    "LoggingFramer",
    "LoggingH1Protocol",
    "LoggingH2Protocol",
    "escape",
    "start",
]
