"""How each server is started for TLS and HTTP/2, and how its readiness is checked then.

A transport turns a server's plain command into the TLS or HTTP/2 one:

- `tls`: nginx `listen ... ssl;` + `ssl_certificate`/`_key`; gunicorn (vrypt and the gevent
  references) `--certfile C --keyfile K`.
- `tls-h2`: nginx `listen ... ssl http2;` (ALPN h2, http/1.1); gunicorn `--certfile C
  --keyfile K --http-protocols h2,h1`.
- `h2c`: nginx `listen ... http2;` (prior knowledge only); gunicorn `--http-protocols h2,h1
  --http2-cleartext prior-knowledge`.
- `h3`: TLS as `tls`, and HTTP/3 on UDP at the same port: gunicorn (vrypt) `-e VRYPT_HTTP3=1`;
  hypercorn `--quic-bind` (servers.py). nginx-light 1.22 has no HTTP/3.

nginx 1.22's defaults are kept but two: `ssl_protocols TLSv1.2 TLSv1.3` (1.22 leaves 1.3 out by
default; gunicorn and the clients negotiate 1.3), and the keep-alive settings of the plain
configuration. Session resumption is each server's default: nginx issues tickets
(`ssl_session_tickets on`, no shared cache); Python's `ssl` (gunicorn) issues TLS 1.3 tickets.

A `--peer` command gets `{certfile}` and `{keyfile}` filled in, and whatever else it needs it
must say itself.
"""

from __future__ import annotations

import shlex
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import h2wire
from bench.servers import (
    FRONT_LOCATIONS,
    NGINX,
    NGINX_CONF,
    NGINX_FRONT_CONF,
    PROBE,
    ServerError,
    ServerSpec,
    free_port,
    probe,
)
from bench.tls import client_context, make_certificate

# What the readiness probe sends first to a server with the PROXY protocol on.
PROXY_PROBE = b"PROXY TCP4 127.0.0.1 127.0.0.1 1 1\r\n"

# The plain nginx configuration with its listen line and TLS lines replaced.
_LISTEN = "        listen 127.0.0.1:{port};\n"
assert _LISTEN in NGINX_CONF

_TLS_LINES = (
    "        ssl_certificate {cert};\n"
    "        ssl_certificate_key {key};\n"
    "        ssl_protocols TLSv1.2 TLSv1.3;\n"
)


@dataclass(frozen=True)
class Transport:
    name: str
    tls: bool
    h2: bool  # the load speaks HTTP/2 (ALPN h2 over TLS, or prior knowledge in cleartext)
    # gunicorn `--keep-alive` when set: the idle-* scenarios hold connections for seconds, and
    # gunicorn's default (2 s) would close them before the reading; nginx's configuration and
    # vrypt's conf/gunicorn.conf.py both keep idle connections 30 s.
    keepalive: int = 0
    h3: bool = False  # HTTP/3 on UDP at the TLS port as well (vrypt: VRYPT_HTTP3)
    # PROXY protocol (issue 22): gunicorn `--proxy-protocol auto`, nginx `listen ...
    # proxy_protocol`; the load sends a header first (bench.proxyload), or none (wrk).
    proxy: bool = False

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def nginx_listen(self) -> str:  # nginx keeps idle connections 30 s (NGINX_CONF)
        words = ("ssl" if self.tls else "", "http2" if self.h2 else "")
        return " ".join((*words, "proxy_protocol" if self.proxy else "")).strip()

    def gunicorn_flags(self, cert: Path, key: Path) -> list[str]:
        flags = ["--certfile", str(cert), "--keyfile", str(key)] if self.tls else []
        if self.h2:
            flags += ["--http-protocols", "h2,h1"]
        if self.h2 and not self.tls:
            flags += ["--http2-cleartext", "prior-knowledge"]
        if self.keepalive:
            flags += ["--keep-alive", str(self.keepalive)]
        if self.h3:
            flags += ["-e", "VRYPT_HTTP3=1"]
        if self.proxy:
            flags += ["--proxy-protocol", "auto"]
        return flags

    def build(self, spec: ServerSpec, port: int, workers: int, tmp: Path) -> list[str]:
        """The server's command line for this transport (certificate made in ``tmp``)."""
        argv = spec.build(port, workers, tmp)
        if not self.tls and not self.h2 and not self.proxy:  # plain: gunicorn's keep-alive
            if argv[:3] == [sys.executable, "-m", "gunicorn"]:
                return [*argv, *self.gunicorn_flags(Path(), Path())]
            return argv
        cert, key = make_certificate(tmp) if self.tls else (Path(), Path())
        if argv[:1] == [NGINX]:
            conf = Path(argv[argv.index("-c") + 1])
            text = conf.read_text()
            listen = _LISTEN.format(port=port)
            if listen not in text:
                raise ServerError(f"{spec.name}: no `listen 127.0.0.1:{port};` line to change")
            extra = f"        listen 127.0.0.1:{port} {self.nginx_listen()};\n"
            if self.tls:
                extra += _TLS_LINES.format(cert=cert, key=key)
            conf.write_text(text.replace(listen, extra))
            return argv
        if argv[:3] == [sys.executable, "-m", "gunicorn"]:
            return [*argv, *self.gunicorn_flags(cert, key)]
        if argv[:2] == ["sh", "-c"]:  # a --peer
            command = argv[2].replace("{certfile}", str(cert)).replace("{keyfile}", str(key))
            return ["sh", "-c", command]
        return argv

    def describe(self) -> str:
        if not self.tls and not self.h2 and not self.proxy:
            flags = " ".join(self.gunicorn_flags(Path(), Path()))
            return "as in the HTTP/1.1 scenarios" + (f"; gunicorn: `{flags}`" if flags else "")
        return (
            f"nginx: `listen 127.0.0.1:PORT {self.nginx_listen()};`"
            + (
                " + `ssl_certificate`, `ssl_certificate_key`, `ssl_protocols TLSv1.2 TLSv1.3`"
                if self.tls
                else ""
            )
            + "; gunicorn: `"
            + " ".join(self.gunicorn_flags(Path("TMPDIR/cert.pem"), Path("TMPDIR/key.pem")))
            + "`"
        )

    def probe(self, port: int, timeout: float = 1.0) -> bytes | None:
        """Like servers.probe for this transport: the status line (HTTP/1.1 over TLS) or
        `HTTP/2 <status>`, None while nothing listens; ServerError when something answers in
        the wrong protocol (a plain server on a TLS port, no h2 by ALPN), which waiting won't
        fix."""
        if not self.tls and not self.h2:  # (a server with PROXY on may require a header)
            return probe(port, timeout, PROXY_PROBE if self.proxy else b"")
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except OSError:
            return None
        with raw:
            sock: socket.socket = raw
            if self.tls:
                ctx = client_context(("h2", "http/1.1") if self.h2 else ())
                try:
                    sock = ctx.wrap_socket(raw)
                except ssl.SSLEOFError:  # closed during the handshake: not ready yet
                    return None
                except ssl.SSLError as exc:
                    raise ServerError(f"TLS handshake failed: {exc}") from None
                except OSError:
                    return None
                if self.h2 and sock.selected_alpn_protocol() != "h2":
                    raise ServerError(
                        f"ALPN chose {sock.selected_alpn_protocol()!r}, not h2 "
                        "(does the server offer h2 over TLS?)"
                    )
            try:
                if self.h2:
                    status, _ = h2wire.get(sock, f"127.0.0.1:{port}", self.scheme)
                    return b"HTTP/2 %d" % status
                sock.sendall(PROBE)
                buf = b""
                while b"\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return None
                    buf += chunk
                return buf.split(b"\r\n", 1)[0]
            except h2wire.H2Error as exc:
                raise ServerError(f"HTTP/2 probe: {exc}") from None
            except ssl.SSLError as exc:
                raise ServerError(f"TLS error: {exc}") from None
            except OSError:
                return None


@dataclass(frozen=True)
class FrontTransport:
    """nginx in front of a gunicorn server (vrypt, or gunicorn's own workers): the load talks
    HTTP/1.1 to nginx, nginx to the server by `uwsgi_pass` (the server gets `--protocol
    uwsgi`) or `proxy_pass` (servers.FRONT_LOCATIONS). Both run in the server's session, on its
    core: the run's CPU is theirs together, and proto.measure splits it (`front µs/req`,
    `backend µs/req`)."""

    name: str
    front: str  # a key of servers.FRONT_LOCATIONS
    tls: bool = False
    h2: bool = False
    keepalive: int = 0
    scheme: str = "http"

    def gunicorn_flags(self) -> list[str]:
        return ["--protocol", "uwsgi"] if self.front == "uwsgi" else []

    def build(self, spec: ServerSpec, port: int, workers: int, tmp: Path) -> list[str]:
        backend = free_port()
        argv = spec.build(backend, workers, tmp)
        if argv[:3] != [sys.executable, "-m", "gunicorn"]:
            raise ServerError(f"{spec.name}: nginx goes in front of gunicorn servers only")
        conf = tmp / "front.conf"
        conf.write_text(
            NGINX_FRONT_CONF.format(
                tmp=tmp, port=port, backend=backend, location=FRONT_LOCATIONS[self.front]
            )
        )
        front = [NGINX, "-p", str(tmp), "-e", str(tmp / "front-error.log"), "-c", str(conf)]
        # nginx in the background, then the server in the shell's place: one session, killed
        # as one group.
        command = shlex.join(front) + " & exec " + shlex.join([*argv, *self.gunicorn_flags()])
        return ["sh", "-c", command]

    def describe(self) -> str:
        return (
            f"nginx (1 worker) in front: `{FRONT_LOCATIONS[self.front].strip().splitlines()[-1]}` "
            "to the server on 127.0.0.1:BACKEND (upstream `keepalive 32`), both on the server's "
            "core; gunicorn: `" + " ".join(self.gunicorn_flags()) + "`"
        )

    def probe(self, port: int, timeout: float = 1.0) -> bytes | None:
        """nginx's answer, None while it cannot reach the server yet (502, 504)."""
        status = probe(port, timeout)
        if status is not None and status.split()[1:2] in ([b"502"], [b"504"]):
            return None
        return status


TRANSPORTS: dict[str, Transport | FrontTransport] = {
    t.name: t
    for t in (
        Transport("tls", tls=True, h2=False),
        Transport("tls-h2", tls=True, h2=True),
        Transport("h2c", tls=False, h2=True),
        Transport("plain", tls=False, h2=False),
        Transport("h3", tls=True, h2=False, h3=True),
        Transport("proxy", tls=False, h2=False, proxy=True),
        FrontTransport("nginx-uwsgi", "uwsgi"),
        FrontTransport("nginx-proxy", "proxy"),
        FrontTransport("nginx-proxy-ka", "proxy-ka"),
    )
}
