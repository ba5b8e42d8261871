"""gunicorn's access log lines for VryptWorker: `accesslog`, `access_log_format`, `logconfig*`.

`AccessLog` builds every line, whatever the transport: the seams in access_log.py report what
was answered (`answered`, `framed`, `refused`, `accepted` for HTTP/1; `h2_request`,
`h2_template`, `fresh_line` for HTTP/2), and the lines go to a writer thread (access_writer.py).
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
  turn) or _HAND_OFF_LINES lines, to a writer thread (access_writer.py) that passes them to
  gunicorn's `gunicorn.access` logger. A slow disk stalls that thread, never the hub; chunks
  waiting for it are bounded, and lines past the bound are dropped and counted.
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
import socket
import time
from _socket import socket as RawSocket
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

from gunicorn.util import split_request_uri

from vrypt_worker.access_writer import LineWriter
from vrypt_worker.h2 import hpack_decoder as hd

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


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """PATH_INFO (percent-decoded) and QUERY_STRING of a request target, as gunicorn derives them
    (`util.split_request_uri`: urllib's urlsplit, `//` kept as a path), so that `%(U)s`,
    `{path_info}e`, `%(q)s` and `{query_string}e` say what gunicorn's do: an absolute-form target
    (`http://u:p@host/abs?x=1`) logs its path only (`/abs`), never scheme, host or credentials,
    and a fragment is not part of the query (`/p#frag?x=1`: `/p`, empty). A target urlsplit
    refuses (gunicorn answers it 400; here it is answered) logs whole, with no query, as
    gunicorn's HTTP/2 request does. Called once per distinct head (the lines are cached)."""
    if target[:1] == b"/" and target[:2] != b"//" and b"#" not in target:
        path, _, query = target.partition(b"?")  # origin-form: what urlsplit gives, cheaper
    else:
        try:
            parts = split_request_uri(target.decode("latin-1"))
        except ValueError:
            return target, b""
        path = parts.path.encode("latin-1")
        query = parts.query.encode("latin-1")
    if b"%" in path:
        path = unquote_to_bytes(path)
    return path, query


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
H2_OK = 0
H2_HEAD = hd.HEAD
H2_TUNNEL = 2
H2_TOO_LARGE = 3
H2_URI_TOO_LONG = 4
assert H2_HEAD == 1 and H2_OK == 0  # the hot path's verdicts are these kinds
# Fields of an `Upgrade: h2c` request that gunicorn does not pass on to stream 1.
_UPGRADE_FIELDS = frozenset((b"connection", b"upgrade", b"http2-settings"))
# An HTTP/2 request's log record: ((table state key, header block) or None, request atoms).
H2Request = tuple[tuple[int, bytes] | None, dict[str, str]]


def _h2_answer_atoms(answers: Any, kind: int) -> dict[str, str]:
    """`s`, `b`, `B` and the `{header}o` atoms of one HTTP/2 answer (h2/answers.py), read
    back from its own HPACK block."""
    variant = {
        H2_OK: answers.ok,
        H2_HEAD: answers.ok,
        H2_TUNNEL: answers.tunnel,
        H2_TOO_LARGE: answers.too_large,
        H2_URI_TOO_LONG: answers.uri_too_long,
    }[kind]
    fields = hd.decode(hd.empty_table(hd.Limits()), variant.block)[0]
    sent = "0" if kind == H2_HEAD else str(len(variant.body))
    atoms = {"s": "-", "b": sent, "B": sent}
    for name, value in fields:
        if name == b":status":
            atoms["s"] = escape(value)
        elif name[:1] != b":":
            atoms[f"{{{escape(name)}}}o"] = escape(value)
    return atoms


def _h3_answer_atoms(answers: Any, head: bool) -> dict[str, str]:
    """`s`, `b`, `B` and the `{header}o` atoms of the HTTP/3 answer (h3/answers.py)."""
    sent = "0" if head else str(len(answers.body))
    atoms = {"s": "-", "b": sent, "B": sent}
    for name, value in answers.ok:
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
        # HTTP/2 (LoggingH2Protocol): templates by (HPACK table state, header block, H2_* kind)
        # and request atoms by (state, block); [0] for h2c, [1] for TLS (the scheme differs).
        self.h2_templates: tuple[dict[Any, str], dict[Any, str]] = ({}, {})
        self.h2_requests: tuple[dict[Any, dict[str, str]], dict[Any, dict[str, str]]] = ({}, {})
        self.h2_answers: dict[int, dict[str, str]] = {}
        # HTTP/3 (quic.py): templates by (request fields, HEAD?), answer atoms by HEAD?
        self.h3_templates: dict[tuple[Any, bool], str] = {}
        self.h3_answers: dict[bool, dict[str, str]] = {}
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
        self.writer = LineWriter(self.logger, self.error)

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
        static.update(self.answer_atoms(kind))
        static["{script_name}e"] = ""
        static["{wsgi.url_scheme}e"] = "http"
        return static

    def answer_atoms(self, kind: int) -> dict[str, str]:
        """`s`, `b`, `B` and `{header}o` of the HTTP/1 answer of this kind (the response
        table's), cached: its parts but its Date (a dynamic atom) never change."""
        answer = self.answers.get(kind)
        if answer is None:
            answer = self.answers[kind] = _answer_atoms(self.worker.responses.bytes_for[kind])
        return answer

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
                path, query = split_target(target)
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

    def h2_request(self, table: hd.Table, block: bytes, tls: bool) -> H2Request:
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

    def h2_upgrade_request(self, head: bytes) -> H2Request:
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

    def h2_template(self, request: H2Request, kind: int, answers: Any, tls: bool) -> str:
        """The line for an HTTP/2 request and the answer it got (`H2_*`), `%s` for the
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

    # HTTP/3 ---------------------------------------------------------------------------------

    def h3_answered(
        self, peer: Any, fields: list[tuple[bytes, bytes]], head: bool, answers: Any
    ) -> None:
        """One HTTP/3 request (its decoded fields) answered with `answers` (h3/answers.py),
        HEAD without the body; `peer` the client's address. Logged as gunicorn would log it with
        `HTTP/3.0` as the protocol; the template is cached by the request's fields."""
        key = (tuple(fields), head)
        template = self.h3_templates.get(key)
        if template is None:
            pseudo: dict[bytes, bytes] = {}
            regular: list[tuple[bytes, bytes]] = []
            for name, value in fields:
                if name[:1] == b":":
                    pseudo.setdefault(name, value)
                else:
                    regular.append((name, value))
            authority = pseudo.get(b":authority")
            if authority:
                regular = [field for field in regular if field[0] != b"host"]
                regular.append((b"host", authority))
            method, path = pseudo.get(b":method", b"GET"), pseudo.get(b":path", b"/")
            atoms = self.request_atoms(
                method + b" " + path + b" HTTP/3.0", method, path, b"HTTP/3.0", regular
            )
            atoms["{script_name}e"] = ""
            atoms["{wsgi.url_scheme}e"] = "https"
            atoms["{http_version}e"] = "3"
            answer = self.h3_answers.get(head)
            if answer is None:
                answer = self.h3_answers[head] = _h3_answer_atoms(answers, head)
            template = self.render({**atoms, **answer})
            if len(self.h3_templates) >= _TEMPLATES:
                self.h3_templates.clear()
            self.h3_templates[key] = template
        self.lines.append(self.fresh_line(Client(peer), template, time.perf_counter()))

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
        self.writer.hand(lines)

    def close(self, timeout: float = 5.0) -> None:
        """Leaving: what is collected goes to the handlers before the process ends."""
        self.turn(force=True)
        self.writer.stop(timeout)
