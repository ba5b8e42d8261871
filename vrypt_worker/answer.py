"""The chosen answer: status, body, content type and extra header lines.

Each part is set by a conf-file variable or an environment variable; the environment wins, as
GUNICORN_CMD_ARGS wins over the conf file in gunicorn (and `-e NAME=value`, gunicorn's raw_env,
sets the environment too):

  conf file            environment           default
  vrypt_status         VRYPT_STATUS          200 (a code, optionally followed by a reason phrase)
  vrypt_body           VRYPT_BODY            Vrypt
  vrypt_body_file      VRYPT_BODY_FILE       (read once at start; exclusive with the body)
  vrypt_content_type   VRYPT_CONTENT_TYPE    text/plain; for a body file, guessed from its name
  vrypt_headers        VRYPT_HEADERS         none; one `Name: value` per line

gunicorn ignores names in a conf file that are not its settings, so these variables cost it
nothing; the worker finds the conf file's namespace where gunicorn left it (sys.modules) and
resolves the answer in the arbiter (VryptWorker.check_config), so that a bad value stops the start
with a message naming the setting, and every worker forked later inherits the result. On HUP the
package conf's on_reload hook resolves it again from the re-run conf file (arbiter.on_reload).
"""

from __future__ import annotations

import mimetypes
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from vrypt_worker.settings import SettingError

# A body is copied into each of three answer variants every second (the Date changes), and
# pipelined answers are sent as one buffer: a bound keeps that cost and memory small.
MAX_BODY = 1 << 20
# Statuses whose answers have no content (RFC 9110 §15.3.5, §15.4.5: no Content-Length either).
NO_CONTENT = frozenset((204, 304))
# 205 Reset Content: no content, but framed with Content-Length: 0 (RFC 9110 §15.3.6).
RESET_CONTENT = 205

_TCHAR = r"!#$%&'*+.^_`|~0-9A-Za-z-"
_FIELD_NAME = re.compile(rf"[{_TCHAR}]+")
# Visible ASCII with inner spaces/tabs; obs-text and control bytes are refused, so a value can
# neither break the head (CR, LF) nor be read differently by two parsers.
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")
_STATUS = re.compile(r"\s*([0-9]{1,9})(?:[ \t]+([\t\x20-\x7e]*?))?\s*")
# Header lines the server writes itself from its own state: framing, connection management, and
# the two it always sends. Content-Type has its own setting.
_RESERVED = frozenset(
    (
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
        "date",
        "server",
        "content-type",
    )
)


@dataclass(frozen=True)
class Answer:
    """What every request is answered with (the framing decides only the connection header)."""

    status: int = 200
    reason: bytes = b"OK"
    body: bytes = b"Vrypt"
    content_type: bytes | None = b"text/plain"
    headers: tuple[bytes, ...] = ()  # whole field lines, without CRLF

    @property
    def status_line(self) -> bytes:
        return b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason)

    @property
    def fields(self) -> bytes:
        """The field lines after Date, up to and including Content-Length (none for 204/304)."""
        out = b""
        if self.content_type is not None:
            out += b"Content-Type: " + self.content_type + b"\r\n"
        for line in self.headers:
            out += line + b"\r\n"
        if self.status not in NO_CONTENT:
            out += b"Content-Length: %d\r\n" % len(self.body)
        return out


DEFAULT = Answer()


@dataclass(frozen=True)
class _Part:
    conf: str
    env: str


STATUS = _Part("vrypt_status", "VRYPT_STATUS")
BODY = _Part("vrypt_body", "VRYPT_BODY")
BODY_FILE = _Part("vrypt_body_file", "VRYPT_BODY_FILE")
CONTENT_TYPE = _Part("vrypt_content_type", "VRYPT_CONTENT_TYPE")
HEADERS = _Part("vrypt_headers", "VRYPT_HEADERS")
PARTS = (STATUS, BODY, BODY_FILE, CONTENT_TYPE, HEADERS)


def _pick(part: _Part, conf: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[str, Any]:
    """(the name to report, the value) from the environment, else the conf file; value None
    when neither sets it. An empty variable is unset, as for the other VRYPT_* variables."""
    raw = environ.get(part.env)
    if raw is not None and raw.strip():
        return f"${part.env}", raw
    value = conf.get(part.conf)
    return part.conf, value


def _text(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise SettingError(name, "expected ASCII text") from None
    if not isinstance(value, str):
        raise SettingError(name, f"expected text, got {type(value).__name__}")
    return value


def parse_status(name: str, value: Any) -> tuple[int, bytes]:
    """`503`, `"503"` or `"503 Down for maintenance"`: the code and its reason phrase."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if text is None:
        text = _text(name, value)
    match = _STATUS.fullmatch(text)
    if not match:
        raise SettingError(name, f"expected a status code 200-599, optionally a reason: {text!r}")
    code = int(match.group(1))
    if not 200 <= code <= 599:
        raise SettingError(name, f"status {code} is outside 200-599")
    reason = match.group(2)
    if not reason:
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = ""  # an unregistered code: the reason phrase may be empty (RFC 9112 §4)
    return code, reason.encode("ascii")


_NAMED = {
    "\r": "a bare CR (\\r)",
    "\n": "a line feed (\\n)",
    "\x0b": "a vertical tab (\\x0b)",
    "\x0c": "a form feed (\\x0c)",
    "\x85": "U+0085 (NEL, next line)",
    "\u2028": "U+2028 (line separator)",
    "\u2029": "U+2029 (paragraph separator)",
    " ": "a space",
    "\t": "a tab",
}


def _what(char: str) -> str:
    """A character an operator may not see in their value, named."""
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte the environment could not decode (surrogateescape)
        return f"the byte 0x{code - 0xDC00:02x} (not ASCII)"
    if code < 0x20 or code == 0x7F:
        return f"the control character {char!r}"
    if code > 0x7E:
        return f"the non-ASCII character U+{code:04X}"
    return repr(char)


def _first_bad(text: str, allowed: Any) -> str:
    return next((char for char in text if not allowed(char)), "")


def header_lines(text: str) -> list[str]:
    """A multi-line value's lines: split at line ends only, LF or CRLF. str.splitlines would
    also end a line at a bare CR, a vertical tab, a form feed, U+0085..., turning a stray
    character into a field line of its own; here it stays in its line and is named there."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def parse_header_lines(name: str, value: Any) -> tuple[bytes, ...]:
    """One `Name: value` per line (a str), or a list of such lines, or a dict name -> value."""
    if isinstance(value, Mapping):
        lines = [f"{_text(name, k)}: {_text(name, v)}" for k, v in value.items()]
    elif isinstance(value, list | tuple):
        lines = [_text(name, line) for line in value]
    else:
        lines = header_lines(_text(name, value))
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip(" \t"):
            continue  # blank lines separate nothing; a trailing newline is usual in YAML
        field_name, colon, field_value = line.partition(":")
        field_value = field_value.strip(" \t")
        if not colon:
            raise SettingError(
                name, f"line {number} {line!r} is not a field line `Name: value` (no colon)"
            )
        if not _FIELD_NAME.fullmatch(field_name):
            bad = _first_bad(field_name, _FIELD_NAME.fullmatch)
            why = f"{_what(bad)} in the name" if bad else "an empty name"
            raise SettingError(
                name,
                f"line {number} {line!r} is not a field line `Name: value`: {why} is invalid "
                "(a name is a token: letters, digits and !#$%&'*+.^_`|~-)",
            )
        if not _FIELD_VALUE.fullmatch(field_value):
            bad = _first_bad(field_value, lambda char: char == "\t" or " " <= char <= "~")
            raise SettingError(
                name,
                f"line {number} {line!r}: {_what(bad)} inside the value is invalid; the value "
                "must be visible ASCII, spaces and tabs",
            )
        if field_name.lower() in _RESERVED:
            hint = " (use the content type setting)" if field_name.lower() == "content-type" else ""
            raise SettingError(
                name, f"line {number}: {field_name} is written by the server itself{hint}"
            )
        out.append(f"{field_name}: {field_value}".encode("ascii"))
    return tuple(out)


def parse_content_type(name: str, value: Any) -> bytes:
    text = _text(name, value).strip(" \t")
    if not text or not _FIELD_VALUE.fullmatch(text):
        raise SettingError(name, f"not a valid field value: {text!r}")
    return text.encode("ascii")


def _body(name: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        body = value
    elif isinstance(value, str):
        # Environment values arrive decoded with surrogateescape: this gives back their bytes.
        body = value.encode("utf-8", "surrogateescape")
    else:
        raise SettingError(name, f"expected text or bytes, got {type(value).__name__}")
    if len(body) > MAX_BODY:
        raise SettingError(name, f"the body is {len(body)} bytes, more than {MAX_BODY}")
    return body


def _body_file(name: str, value: Any) -> bytes:
    path = os.path.abspath(_text(name, value) if not isinstance(value, os.PathLike) else value)
    try:
        with open(path, "rb") as source:
            body = source.read(MAX_BODY + 1)
    except OSError as exc:
        raise SettingError(name, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(body) > MAX_BODY:
        raise SettingError(name, f"{path} is larger than {MAX_BODY} bytes")
    return body


def from_settings(conf: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Answer:
    """The answer the settings ask for; SettingError naming the first bad one."""
    status_name, status_value = _pick(STATUS, conf, environ)
    status, reason = (200, b"OK")
    if status_value is not None:
        status, reason = parse_status(status_name, status_value)

    # The body and the body file are one choice: the environment's, else the conf file's.
    env_body = environ.get(BODY.env)  # set and empty is an empty body, a real choice
    env_file = environ.get(BODY_FILE.env, "").strip() or None
    if env_body is not None or env_file is not None:
        body_value, file_value = env_body, env_file
        body_name, file_name = f"${BODY.env}", f"${BODY_FILE.env}"
    else:
        body_value, file_value = conf.get(BODY.conf), conf.get(BODY_FILE.conf)
        body_name, file_name = BODY.conf, BODY_FILE.conf
    if body_value is not None and file_value is not None:
        raise SettingError(file_name, f"set together with {body_name}: choose one")
    chosen: tuple[str, bytes] | None = None
    if body_value is not None:
        chosen = body_name, _body(body_name, body_value)
    elif file_value is not None:
        chosen = file_name, _body_file(file_name, file_value)

    type_name, type_value = _pick(CONTENT_TYPE, conf, environ)
    if type_value is not None:
        content_type: bytes | None = parse_content_type(type_name, type_value)
    elif file_value is not None and body_value is None:
        guessed, _encoding = mimetypes.guess_type(str(file_value), strict=True)
        content_type = (guessed or "text/plain").encode("ascii")
    elif status in NO_CONTENT or status == RESET_CONTENT:
        content_type = None  # nothing to describe
    else:
        content_type = DEFAULT.content_type

    body = DEFAULT.body
    if status in NO_CONTENT or status == RESET_CONTENT:
        if chosen is not None and chosen[1]:
            raise SettingError(chosen[0], f"a {status} answer has no body (RFC 9110)")
        body = b""
    elif chosen is not None:
        body = chosen[1]

    headers_name, headers_value = _pick(HEADERS, conf, environ)
    headers = () if headers_value is None else parse_header_lines(headers_name, headers_value)
    return Answer(status, reason, body, content_type, headers)


def conf_namespace(config: str | None) -> Mapping[str, Any]:
    """The variables of the conf file gunicorn loaded (the `config` setting): gunicorn runs a
    conf file as the module `__config__` and a `python:NAME` conf as an ordinary import, and
    keeps both in sys.modules. Empty when no conf file was loaded."""
    if config and config.startswith("python:"):
        module = sys.modules.get(config[len("python:") :])
    else:
        module = sys.modules.get("__config__")
    return vars(module) if module is not None else {}


_active = DEFAULT


def activate(answer: Answer) -> None:
    """Make `answer` the one every ResponseTable renders (set in the arbiter before the forks)."""
    global _active
    _active = answer


def active() -> Answer:
    return _active
