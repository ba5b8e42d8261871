"""gunicorn's access log for VryptWorker: `accesslog`, `access_log_format`, `logconfig*`.

Selected once, at worker start, when gunicorn's logger says the access log is on
(`Logger.access_log_enabled`): the worker then accepts `LoggingConnection`s instead of
`Connection`s, and its protocol factory (cleartext.py) builds `LoggingH1Protocol` (HTTP/1 in TLS
or on an h2c port) and `LoggingH2Protocol` (every HTTP/2 stream: h2c, upgrade, TLS) instead of
their originals.

HTTP/1 reaches the log through one seam, `AccessLog.answered` / `framed` / `refused` (and
`accepted`, for an answer given at the accept, worker.py): each path reports the head it
answered, the answer kind and when the read began, and the lines are built here only. The
HTTP/1 classes below are thin layers that call the originals: the framer records the heads it
finds when given a list (RequestFramer.feed; off, one test per new head), and the only copied
code is the keep-alive branch of Connection.on_readable (LoggingConnection says why).

The cost with the log on is kept near nginx's (docs/performance.md):
- A line is `template % dynamic`. The template is the format rendered once per (request head,
  answer kind) with every atom that depends only on those two (r m U q H s B b f a u, `{x}i`,
  most `{x}o` and `{x}e`) filled in and escaped, and cached by the head's bytes as the framer
  caches verdicts; only the atoms that change with the connection, the second or the request
  (h t T D M L, `{date}o`, `{remote_addr}e`, `{remote_port}e`) are filled per request, and the
  clock is read per request only when the format asks for a duration.
- While the second and the client's address stay the same, a repeated keep-alive head reuses
  the last line as it is (unless the format has a duration or the client's port).
- Lines are collected and handed, as one chunk, every _HAND_OFF seconds (checked once per loop
  turn) or _HAND_OFF_LINES lines, to a writer thread that passes them to gunicorn's
  `gunicorn.access` logger: one record (one write) per chunk when every handler
  writes `%(message)s` as gunicorn's own do, else one record per line so that a `logconfig_dict`
  formatter sees each line. A slow disk stalls that thread, never the hub. Chunks waiting for it
  are bounded (_MAX_QUEUED characters): past the bound, lines are dropped and counted, and the
  count goes to the error log once the writer catches up (nginx would block its worker instead).
- USR1 is gunicorn's `reopen_files`, as before: handlers are reopened under their locks.

Escaping: gunicorn replaces `"` with `\\"` in every string atom. Its parser never lets a control
byte through; ours answers malformed requests too (400 and friends are logged), so in addition a
backslash becomes `\\\\` and every byte outside printable ASCII (CR, LF, other controls, DEL,
non-ASCII) becomes `\\xHH`, as nginx writes them: a line is one line, in ASCII, whatever the client
sent.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import select
import socket
import stat
import threading
import time
from _socket import socket as RawSocket
from collections import deque
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

from vrypt_worker.framing import CLOSING, CONTINUE, OK, FramingRules, RequestFramer
from vrypt_worker.h1_protocol import H1Protocol
from vrypt_worker.h2 import hpack_decoder as hd
from vrypt_worker.h2.answers import H2Answers, Variant
from vrypt_worker.h2.connection import H2Config, H2Protocol
from vrypt_worker.plain import Connection

# Characters of lines waiting for the writer thread beyond which new lines are dropped: a disk
# that stalls for seconds under 100k requests/s costs at most this much memory (x4 as str).
_MAX_QUEUED = 16 * 1024 * 1024
# The request line of a malformed request is logged up to this many bytes.
_MAX_LINE = 2048
# Collected lines go to the writer thread at most this often (seconds), or once there are this
# many: each hand-off wakes the thread, which then competes with the hub for the GIL.
_HAND_OFF = 0.1
_HAND_OFF_LINES = 1024
_TEMPLATES = 1024  # cached templates (heads x kinds) before the cache starts over
_TEMPLATE_HEAD_MAX = 2048  # longer heads get a template each time (as the framer's cache)

# Atoms filled per request, each from (connection, log, duration in seconds).
_DYNAMIC = {
    "h": "c.log_addr",
    "{remote_addr}e": "c.log_addr",
    "{remote_port}e": "c.log_port",
    "t": "L.t",
    "{date}o": "L.date",
    "T": "str(int(d))",
    "D": "str(int(d * 1000000))",
    "M": "str(int(d * 1000))",
    "L": "'%d.%06d' % (int(d), int(d * 1000000) % 1000000)",
}
_TIMED = frozenset("TDML")
_PARTS_ATOMS = frozenset(
    ("m", "U", "q", "H", "{request_method}e", "{raw_uri}e", "{path_info}e")
) | {"{query_string}e", "{server_protocol}e"}
_LINE_ATOMS = frozenset(
    ("r", "m", "U", "q", "H", "{request_method}e", "{raw_uri}e", "{path_info}e")
) | {"{query_string}e", "{server_protocol}e"}

_ESCAPES = {i: f"\\x{i:02X}" for i in range(256) if not 0x20 <= i < 0x7F}
_ESCAPES[ord('"')] = '\\"'
_ESCAPES[ord("\\")] = "\\\\"


def escape(raw: bytes) -> str:
    """gunicorn's `"` escaping, plus `\\` and every byte outside printable ASCII as nginx does."""
    text = raw.decode("latin-1")
    # The usual value needs none: tested in C, instead of a dict lookup per character.
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.translate(_ESCAPES)


class _Probe(dict):
    """A mapping that records the atoms a format asks for, in order, and fills in markers."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def __getitem__(self, key: str) -> str:
        if key.startswith("{"):
            key = key.lower()
        self.asked.append(key)
        return "\x00"


class _Atoms(dict):
    """Static atoms for one template; dynamic ones become markers, unknown ones `-` (SafeAtoms)."""

    def __init__(self, static: dict[str, str], dynamic: frozenset[str]) -> None:
        super().__init__()
        self.static = static
        self.dynamic = dynamic

    def __getitem__(self, key: str) -> str:
        if key.startswith("{"):
            key = key.lower()
        if key in self.dynamic:
            return "\x00"
        return self.static.get(key, "-")


def _parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The request line and the field lines of a (possibly partial or malformed) head."""
    head = head.lstrip(b"\r\n")
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        head = head[:end]
    line, _, rest = head.partition(b"\r\n")
    if not rest and len(line) > _MAX_LINE:
        line = line[:_MAX_LINE]
    fields = []
    for field in rest.split(b"\r\n") if rest else ():
        name, colon, value = field.partition(b":")
        if colon:
            fields.append((name.strip().lower(), value.strip(b" \t")))
    return line, fields


def _user(authorization: bytes | None) -> str:
    """gunicorn's `u`: the user of Basic credentials, else `-`."""
    if not authorization or not authorization.lower().startswith(b"basic"):
        return "-"
    parts = authorization.split(b" ", 1)
    if len(parts) != 2:
        return "-"
    try:
        return escape(
            base64.b64decode(parts[1].strip())
            .split(b":", 1)[0]
            .decode("utf-8")
            .encode("latin-1", "backslashreplace")
        )
    except (binascii.Error, UnicodeError, ValueError):
        return "-"


def _answer_atoms(answer: bytes) -> dict[str, str]:
    """`s`, `b`, `B` and the `{header}o` atoms of one rendered answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    sent = str(len(body))  # gunicorn's resp.sent: body bytes
    atoms = {"s": lines[0].split(b" ", 2)[1].decode("ascii"), "b": sent, "B": sent}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        atoms[f"{{{escape(name.strip().lower())}}}o"] = escape(value.strip())
    return atoms


# HTTP/2 answers, as LoggingH2Protocol names them: the first two are the hot path's verdicts.
_H2_OK = 0
_H2_HEAD = hd.HEAD
_H2_TUNNEL = 2
_H2_TOO_LARGE = 3
_H2_URI_TOO_LONG = 4
assert _H2_HEAD == 1 and _H2_OK == 0  # the hot path's verdicts are these kinds
# Fields of an `Upgrade: h2c` request that gunicorn does not pass on to stream 1.
_UPGRADE_FIELDS = frozenset((b"connection", b"upgrade", b"http2-settings"))
# An HTTP/2 request's log record: ((table state key, header block) or None, request atoms).
_H2Request = tuple[tuple[int, bytes] | None, dict[str, str]]


def _h2_answer_atoms(answers: Any, kind: int) -> dict[str, str]:
    """`s`, `b`, `B` and the `{header}o` atoms of one HTTP/2 answer (h2/answers.py), read
    back from its own HPACK block."""
    variant = {
        _H2_OK: answers.ok,
        _H2_HEAD: answers.ok,
        _H2_TUNNEL: answers.tunnel,
        _H2_TOO_LARGE: answers.too_large,
        _H2_URI_TOO_LONG: answers.uri_too_long,
    }[kind]
    fields = hd.decode(hd.empty_table(hd.Limits()), variant.block)[0]
    sent = "0" if kind == _H2_HEAD else str(len(variant.body))
    atoms = {"s": "-", "b": sent, "B": sent}
    for name, value in fields:
        if name == b":status":
            atoms["s"] = escape(value)
        elif name[:1] != b":":
            atoms[f"{{{escape(name)}}}o"] = escape(value)
    return atoms


class Client:
    """Who a line is about, one per connection: the client's address and port as logged (`h`,
    `{remote_addr}e`, `{remote_port}e`), when the read being answered began (`log_start`, for
    the durations), and whether a framer answered that read (`fed`)."""

    __slots__ = ("fed", "log_addr", "log_port", "log_start")

    def __init__(self, name: Any) -> None:
        if isinstance(name, tuple):
            self.log_addr = escape(str(name[0]).encode("latin-1", "replace"))
            self.log_port = str(name[1])
        else:  # a unix socket: gunicorn's REMOTE_ADDR is empty there too
            self.log_addr = "-"
            self.log_port = "-"
        # (set by each read; this for a read made before the connection was: at its accept)
        self.log_start = time.perf_counter()
        self.fed = False

    @classmethod
    def of(cls, sock: Any) -> Client:
        """The client at the other end of a connected socket (None: unknown)."""
        try:
            name = sock.getpeername() if sock is not None else None
        except OSError:
            name = None
        return cls(name)


class AccessLog:
    """One worker's access log: templates, the per-second atoms, and the writer thread."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.heads: list[bytes | None] = []  # the heads of a framer's last answers (LoggingFramer)
        log = worker.log
        self.logger: logging.Logger = log.access_log
        self.error = log
        self.format: str = worker.cfg.access_log_format
        probe = _Probe()
        try:
            self.format % probe
        except (TypeError, ValueError, KeyError):
            probe.asked = []
        self.order = [key for key in probe.asked if key in _DYNAMIC]
        self.dynamic = frozenset(self.order)
        self.timed = bool(self.dynamic & _TIMED)
        # What a new head must be parsed for: only the atoms the format asks for.
        self.asked = frozenset(probe.asked) - self.dynamic
        self.need_line = bool(self.asked & _LINE_ATOMS)
        self.need_head = self.need_line or any(
            key in ("f", "a", "u") or key.endswith("}i") or key.endswith("}e") for key in self.asked
        )
        self.answers: dict[int, dict[str, str]] = {}
        # The per-request part, generated once from the format: a tuple of the dynamic atoms in
        # the order the format asks for them (names from _DYNAMIC only, never user text).
        source = "lambda c, L, d: ({},)".format(", ".join(_DYNAMIC[key] for key in self.order))
        self.fill = eval(source) if self.order else None
        self.pid = f"<{os.getpid()}>"
        self.templates: dict[tuple[bytes, int], str] = {}
        # HTTP/2 (LoggingH2Protocol): templates by (HPACK table state, header block, _H2_* kind)
        # and request atoms by (state, block); [0] for h2c, [1] for TLS (the scheme differs).
        self.h2_templates: tuple[dict[Any, str], dict[Any, str]] = ({}, {})
        self.h2_requests: tuple[dict[Any, dict[str, str]], dict[Any, dict[str, str]]] = ({}, {})
        self.h2_answers: dict[int, dict[str, str]] = {}
        # The head and answer kind of the last HTTP/1 line, and its template: a keep-alive
        # client repeats its request (`answered`).
        self.recent_head = b""
        self.recent_kind = -1
        self.recent_template = ""
        self.heads: list[bytes | None] = []  # what LoggingFramer.feed answered, shared
        # Atoms that are the same for every request from one address within a second: then
        # the keep-alive path reuses the last line (wrk, health checkers, load balancers).
        self.per_second = not self.dynamic & (_TIMED | {"{remote_port}e"})
        self.line_template: str | None = None
        self.line_addr = ""
        self.last_line = ""
        # ...and for HTTP/1, the head and answer kind of that line while it may be reused: the
        # keep-alive read probes these (LoggingConnection.on_readable) before calling `answered`.
        self.line_head: bytes | None = None
        self.line_kind = -1
        self.handed = 0.0
        self.second = -1
        self.t = ""
        self.date = ""
        self.tick(time.time())
        self.lines: list[str] = []
        # Writer thread state: chunks waiting, their size, lines dropped at the bound.
        self.queue: deque[list[str]] = deque()
        self.queued = 0
        self.dropped = 0
        self.ready = threading.Condition(threading.Lock())
        self.stopping = False
        self.whole = False  # one record per batch, else PIPE_BUF-sized records (_records)
        self.batch = self._batchable()
        self.thread = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self.thread.start()

    # the hub's side ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        second = int(now)
        if second != self.second:
            self.second = second
            self.t = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second))
            self.date = formatdate(second, usegmt=True)
            self.line_template = None  # the cached line names the second
            self.line_head = None

    def template(self, head: bytes, kind: int) -> str:
        """The line for this head and answer kind with its static atoms in, `%s` for the rest."""
        key = (head, kind)
        found = self.templates.get(key)
        if found is not None:
            return found
        found = self.render(self._static(head, kind))
        if len(head) <= _TEMPLATE_HEAD_MAX:
            if len(self.templates) >= _TEMPLATES:
                self.templates.clear()
            self.templates[key] = found
        return found

    def render(self, static: dict[str, str]) -> str:
        """The format with these static atoms in and `%s` for each dynamic one."""
        text = self.format % _Atoms(static, self.dynamic) if self.format else ""
        if self.fill is not None:
            # Markers become %s; a % the format itself rendered is doubled to stay literal.
            text = "%s".join(part.replace("%", "%%") for part in text.split("\x00"))
        return text

    def _static(self, head: bytes, kind: int) -> dict[str, str]:
        """The atoms the format asks for that depend only on the head and the answer kind
        (only those: a head seen for the first time costs its parse, once)."""
        line, fields = _parse_head(head) if self.need_head else (b"", [])
        method = target = version = b""
        if self.need_line:
            parts = line.split(b" ")
            if len(parts) == 3:
                method, target, version = parts
            elif parts:
                method = parts[0]
                target = parts[1] if len(parts) > 1 else b""
        static = self.request_atoms(line, method, target, version, fields)
        answer = self.answers.get(kind)
        if answer is None:  # the answer's parts but its Date (a dynamic atom) never change
            answer = self.answers[kind] = _answer_atoms(self.worker.responses.bytes_for[kind])
        static.update(answer)
        static["{script_name}e"] = ""
        static["{wsgi.url_scheme}e"] = "http"
        return static

    def request_atoms(
        self,
        line: bytes,
        method: bytes,
        target: bytes,
        version: bytes,
        fields: list[tuple[bytes, bytes]],
    ) -> dict[str, str]:
        """The atoms the format asks for that come from the request: its line, its parts
        (`method target version`), its fields (names lowercase, in order)."""
        asked = self.asked
        static = {"l": "-", "p": self.pid}
        if self.need_line:
            static["r"] = escape(line) if line else "-"
            if asked & _PARTS_ATOMS:
                path, _, query = target.partition(b"?")
                if b"%" in path:
                    path = unquote_to_bytes(path)
                static["m"] = escape(method) if method else "-"
                static["U"] = escape(path) if target else "-"
                static["q"] = escape(query)
                static["H"] = escape(version) if version else "-"
                static["{request_method}e"] = static["m"]
                static["{raw_uri}e"] = escape(target) if target else "-"
                static["{path_info}e"] = static["U"]
                static["{query_string}e"] = static["q"]
                static["{server_protocol}e"] = static["H"]
        if fields:
            headers: dict[bytes, bytes] = {}
            for name, value in fields:
                headers[name] = headers[name] + b"," + value if name in headers else value
                key = f"{{{name.decode('latin-1')}}}i"
                if key in asked:
                    static[key] = escape(value)
            if "f" in asked and b"referer" in headers:
                static["f"] = escape(headers[b"referer"])
            if "a" in asked and b"user-agent" in headers:
                static["a"] = escape(headers[b"user-agent"])
            if "u" in asked:
                static["u"] = _user(headers.get(b"authorization"))
            for name, value in headers.items():
                key = name.decode("latin-1").lower().replace("-", "_")
                if key not in ("content_type", "content_length"):
                    key = "http_" + key
                key = f"{{{key}}}e"
                if key in asked:
                    static[key] = escape(value)
        return static

    def h2_request(self, table: hd.Table, block: bytes, tls: bool) -> _H2Request:
        """An HTTP/2 request's log record: its cache key and its request atoms. The block is
        decoded again, in full, from the table state it was decoded from (a pure function: the
        connection's table is not touched), unless these atoms are cached."""
        key = (table.key, block) if len(block) <= hd.CACHE_BLOCK_MAX else None
        cache = self.h2_requests[tls]
        atoms = cache.get(key) if key is not None else None
        if atoms is None:
            fields = hd.decode(table, block)[0] if self.need_head else []
            pseudo: dict[bytes, bytes] = {}
            regular: list[tuple[bytes, bytes]] = []
            for name, value in fields:
                if name[:1] == b":":
                    pseudo.setdefault(name, value)
                else:
                    regular.append((name, value))
            # gunicorn's HTTP2Request: `:authority` is the Host field, the path `/` if none.
            authority = pseudo.get(b":authority")
            if authority:
                regular = [field for field in regular if field[0] != b"host"]
                regular.append((b"host", authority))
            atoms = self._h2_atoms(
                pseudo.get(b":method", b"GET"), pseudo.get(b":path", b"/"), regular, tls
            )
            if key is not None:
                if len(cache) >= _TEMPLATES:
                    cache.clear()
                cache[key] = atoms
        return key, atoms

    def h2_upgrade_request(self, head: bytes) -> _H2Request:
        """The log record of an `Upgrade: h2c` request, stream 1 of its connection: gunicorn
        logs it as an HTTP/2 request with the HTTP/1 fields but the upgrade's own."""
        line, fields = _parse_head(head)
        parts = line.split(b" ")
        regular = [field for field in fields if field[0] not in _UPGRADE_FIELDS]
        return None, self._h2_atoms(parts[0], parts[1] if len(parts) > 1 else b"/", regular, False)

    def _h2_atoms(
        self, method: bytes, path: bytes, regular: list[tuple[bytes, bytes]], tls: bool
    ) -> dict[str, str]:
        atoms = self.request_atoms(
            method + b" " + path + b" HTTP/2.0", method, path, b"HTTP/2.0", regular
        )
        atoms["{script_name}e"] = ""
        atoms["{wsgi.url_scheme}e"] = "https" if tls else "http"
        atoms["{http_version}e"] = "2"  # gunicorn's HTTP/2 worker sets HTTP_VERSION
        return atoms

    def h2_template(self, request: _H2Request, kind: int, answers: Any, tls: bool) -> str:
        """The line for an HTTP/2 request and the answer it got (`_H2_*`), `%s` for the
        dynamic atoms; cached by (table state, block, kind) when the request has a key."""
        key, atoms = request
        templates = self.h2_templates[tls]
        if key is not None:
            found = templates.get((key[0], key[1], kind))
            if found is not None:
                return found
        answer = self.h2_answers.get(kind)
        if answer is None:  # as for HTTP/1: only the Date changes, and it is dynamic
            answer = self.h2_answers[kind] = _h2_answer_atoms(answers, kind)
        found = self.render({**atoms, **answer})
        if key is not None:
            if len(templates) >= _TEMPLATES:
                templates.clear()
            templates[(key[0], key[1], kind)] = found
        return found

    def line(self, conn: Any, head: bytes, kind: int, duration: float) -> str:
        template = self.template(head, kind)
        if self.fill is None:
            return template
        return template % self.fill(conn, self, duration)

    def fresh_line(self, conn: Any, template: str, start: float) -> str:
        """A line formatted now (the keep-alive path's cached one did not fit)."""
        self.line_head = None  # (set again by `answered` when this line is an HTTP/1 one)
        fill = self.fill
        if fill is None:
            return template
        duration = time.perf_counter() - start if self.timed else 0.0
        line = template % fill(conn, self, duration)
        if self.per_second:  # the same line for the same head and address, this second
            self.line_template = template
            self.line_addr = conn.log_addr
            self.last_line = line
        return line

    # The seam: what the HTTP/1 paths report --------------------------------------------------

    def answered(
        self, client: Client, head: bytes, kind: int, start: float, count: int = 1
    ) -> None:
        """`count` answers of `kind` to the whole head `head` (one: a keep-alive read; more:
        pipelined copies of it), whose read began at `start`. The head answered last reuses its
        template without hashing the head, and its line while the second and the client's
        address are the same (the usual keep-alive client)."""
        if head == self.recent_head and kind == self.recent_kind:
            template = self.recent_template
        else:
            template = self.template(head, kind)
            self.recent_head = head
            self.recent_kind = kind
            self.recent_template = template
        if template is self.line_template and client.log_addr == self.line_addr:
            line = self.last_line
        else:
            line = self.fresh_line(client, template, start)
            if self.line_template is template:  # reusable within the second
                self.line_head = head
                self.line_kind = kind
        if count == 1:
            self.lines.append(line)
        else:
            self.lines.extend([line] * count)

    def framed(self, client: Client, out: list[int], heads: list[bytes | None]) -> None:
        """The answers of one framer read (`out`, RequestFramer.feed) and their heads (None: an
        interim 100, not an answer), the read having begun at `client.log_start`."""
        duration = time.perf_counter() - client.log_start if self.timed else 0.0
        lines = self.lines
        previous: tuple[bytes, int] | None = None
        line = ""
        for kind, head in zip(out, heads, strict=True):
            if head is None:
                continue
            # Pipelined requests are often the same bytes again: the same line again.
            if previous is None or previous[0] is not head or previous[1] != kind:
                line = self.line(client, head, kind, duration)
                previous = (head, kind)
            lines.append(line)

    def refused(self, client: Client, head: bytes, kind: int) -> None:
        """The server's own final answer (408, 431) to the request `head` began."""
        self.lines.append(self.line(client, head, kind, 0.0))

    def accepted(self, fd: int, family: int, head: bytes, kind: int) -> None:
        """An answer given at the accept, on the bare descriptor `fd` (worker.py,
        `_read_at_accept`), in the same turn as its read: its durations (about 0) run from
        here. The client's address is asked here, so that the accept path pays nothing for it
        with the log off."""
        sock = RawSocket(family, socket.SOCK_STREAM, 0, fd)  # (C-level: no socket.py __init__)
        try:
            client = Client.of(sock)
        finally:
            sock.detach()  # the descriptor stays the worker's to close
        self.answered(client, head, kind, time.perf_counter())

    def turn(self, force: bool = False) -> None:
        """Once per loop turn (a prepare watcher): the second's atoms, and the lines collected
        to the writer thread every _HAND_OFF seconds or _HAND_OFF_LINES lines."""
        now = time.time()
        if int(now) != self.second:
            self.tick(now)
        lines = self.lines
        if not lines:
            return
        if not force and len(lines) < _HAND_OFF_LINES and now - self.handed < _HAND_OFF:
            return
        self.handed = now
        self.lines = []
        size = sum(map(len, lines))
        with self.ready:
            if self.queued + size > _MAX_QUEUED:
                self.dropped += len(lines)
                return
            self.queued += size
            self.queue.append(lines)
            self.ready.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Leaving: what is collected goes to the handlers before the process ends."""
        self.turn(force=True)
        with self.ready:
            self.stopping = True
            self.ready.notify()
        self.thread.join(timeout)

    # the writer thread's side --------------------------------------------------------------------

    def _batchable(self) -> bool:
        """Whether one record may carry many lines: every handler that will see it writes the
        message alone (gunicorn's own access handlers, `%(message)s`) and nothing filters."""
        logger: logging.Logger | None = self.logger
        if logger is None or logger.filters:
            return False
        handlers: list[logging.Handler] = []
        while logger is not None:
            handlers.extend(logger.handlers)
            if not logger.propagate:
                break
            logger = logger.parent
        whole = True
        for handler in handlers:
            if handler.filters or not isinstance(handler, logging.StreamHandler):
                return False
            if handler.formatter is not None and handler.formatter._fmt != "%(message)s":
                return False
            try:
                regular = stat.S_ISREG(os.fstat(handler.stream.fileno()).st_mode)
            except (AttributeError, OSError, ValueError):
                regular = False
            whole = whole and regular
        self.whole = whole
        return True

    def _records(self, lines: list[str]) -> list[str]:
        """Lines joined into records: one for a regular file (an O_APPEND write is not
        interleaved with another worker's); for a pipe or a terminal (`-`), records of at most
        PIPE_BUF bytes, the size up to which the kernel keeps two workers' writes apart."""
        if self.whole:
            return ["\n".join(lines)]
        records: list[str] = []
        group: list[str] = []
        size = 0
        for line in lines:
            if group and size + len(line) + 1 > select.PIPE_BUF:
                records.append("\n".join(group))
                group = []
                size = 0
            group.append(line)
            size += len(line) + 1
        if group:
            records.append("\n".join(group))
        return records

    def _write_loop(self) -> None:
        logger = self.logger
        while True:
            with self.ready:
                while not self.queue and not self.stopping:
                    self.ready.wait()
                chunks = list(self.queue)
                self.queue.clear()
                self.queued = 0
                dropped, self.dropped = self.dropped, 0
                stopping = self.stopping
            try:
                if chunks:
                    if self.batch:
                        lines = [line for chunk in chunks for line in chunk]
                        for record in self._records(lines):
                            logger.info(record)
                    else:
                        for chunk in chunks:
                            for line in chunk:
                                logger.info(line)
                if dropped:
                    self.error.warning(
                        "access log: %d lines dropped, the log's output was slower than the "
                        "requests",
                        dropped,
                    )
            except Exception:
                self.error.exception("access log: writing failed")
            if stopping:
                return


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
        self._log_requests: dict[int, _H2Request] = {}  # streams opened, not yet answered
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
        `block` the table state decodes, without inserting, to `verdict` (the kind: _H2_OK,
        _H2_HEAD)."""
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
                kind = _H2_HEAD if head else _H2_OK
            elif variant is answers.too_large:
                kind = _H2_TOO_LARGE
            elif variant is answers.uri_too_long:
                kind = _H2_URI_TOO_LONG
            else:
                kind = _H2_TUNNEL
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
