"""StatsD: where the metrics go (gunicorn's own statsd settings and VRYPT_STATSD_INTERVAL), the
clients that send them with dogstatsd tags, and reporting a collector that cannot work once for
the whole server (docs/metrics.md, "A collector that is not running").
"""

from __future__ import annotations

import errno
import mmap
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gunicorn import util
from statsd.client.base import StatsClientBase

from vrypt_worker.settings import DEFAULT_STATSD_INTERVAL, statsd_interval_from_env

# The interval's parser and default live with the other VRYPT_* settings (settings.py).
DEFAULT_INTERVAL = DEFAULT_STATSD_INTERVAL
interval_from_env = statsd_interval_from_env


def statsd_prefix(raw: str | None) -> str:
    """gunicorn's normalisation of statsd_prefix (gunicorn/instrument/statsd.py): one dot."""
    return re.sub(r"^(.+[^.]+)\.*$", "\\g<1>.", raw or "")


@dataclass(frozen=True)
class Settings:
    """What the pusher sends where, from gunicorn's own statsd settings."""

    host: Any  # gunicorn's parsed statsd_host: (host, port), or a path for unix://PATH
    prefix: str = ""
    tags: str = ""
    interval: float = DEFAULT_INTERVAL

    @classmethod
    def from_cfg(cls, cfg: Any) -> Settings | None:
        if cfg.statsd_host is None:
            return None
        return cls(
            host=cfg.statsd_host,
            prefix=statsd_prefix(cfg.statsd_prefix),
            tags=cfg.dogstatsd_tags or "",
            interval=interval_from_env(),
        )

    @property
    def target(self) -> str:
        host = self.host
        return f"unix:{host}" if isinstance(host, str) else f"{host[0]}:{host[1]}"


# --- StatsD clients --------------------------------------------------------------------------


class _TaggedSend:
    """Sends each line on the client's connected socket with the dogstatsd tags appended."""

    _sock: socket.socket
    _suffix: str

    def _send(self, data: str) -> None:
        self._sock.send((data + self._suffix).encode("ascii"))


Resolver = Callable[..., list[Any]]  # socket.getaddrinfo's signature


def literal_address(host: str, port: int, family: int) -> tuple[Any, ...] | None:
    """The socket address of an IP literal (the default 127.0.0.1), None for a name. A literal
    needs no resolver: in a worker, gevent's resolver and the IDNA codec that getaddrinfo loads
    for any str host would be imported after the fork, and cost that worker about 3 MB of
    memory it does not share (docs/performance.md, "Memory")."""
    try:
        socket.inet_pton(family, host)
    except (OSError, ValueError):
        return None
    return (host, port) if family == socket.AF_INET else (host, port, 0, 0)


def is_name(host: Any) -> bool:
    """True for a statsd_host that names a host rather than an IP literal or a unix socket."""
    if isinstance(host, str):
        return False
    family = socket.AF_INET6 if util.is_ipv6(host[0]) else socket.AF_INET
    return literal_address(host[0], int(host[1]), family) is None


class TaggedStatsClient(_TaggedSend, StatsClientBase):
    """pystatsd's UDP client with dogstatsd tags (`|#k:v,...` on every line, as gunicorn does),
    on a connected socket whose send errors reach the caller: pystatsd swallows them, and an
    unconnected socket never hears that nobody listens. `getaddrinfo` is replaceable so that a
    worker that pushes can resolve through gevent's resolver instead of blocking its hub."""

    def __init__(
        self,
        host: str,
        port: int,
        tags: str = "",
        ipv6: bool = False,
        getaddrinfo: Resolver = socket.getaddrinfo,
    ) -> None:
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        addr = literal_address(host, port, family)
        if addr is None:  # a name: as pystatsd's StatsClient does; may raise gaierror
            family, _, _, _, addr = getaddrinfo(host, port, family, socket.SOCK_DGRAM)[0]
        self._addr = addr
        self._prefix = None
        self._maxudpsize = 512
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.connect(addr)
        except OSError:
            self._sock.close()
            raise
        self._suffix = f"|#{tags}" if tags else ""

    def close(self) -> None:
        self._sock.close()


class UnixDatagramStatsClient(_TaggedSend, StatsClientBase):
    """The same for `statsd_host = "unix://PATH"`: a datagram socket, like gunicorn's logger."""

    def __init__(self, path: str, tags: str = "") -> None:
        self._prefix = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._suffix = f"|#{tags}" if tags else ""

    def close(self) -> None:
        self._sock.close()


def make_client(settings: Settings, getaddrinfo: Resolver = socket.getaddrinfo) -> StatsClientBase:
    host = settings.host
    if isinstance(host, str):
        return UnixDatagramStatsClient(host, settings.tags)
    return TaggedStatsClient(
        host[0], int(host[1]), settings.tags, ipv6=util.is_ipv6(host[0]), getaddrinfo=getaddrinfo
    )


# --- reporting a broken collector once ---------------------------------------------------------

_notice_map: mmap.mmap | None = None
_notice_words: memoryview | None = None


def notices() -> memoryview:
    """A shared page of "already reported" flags, mapped by the arbiter before it forks (the
    logger maps it when gunicorn builds it, `start` at the latest)."""
    global _notice_map, _notice_words
    if _notice_words is None:
        _notice_map = mmap.mmap(-1, mmap.PAGESIZE)
        _notice_words = memoryview(_notice_map).cast("Q")
    return _notice_words


def first_report() -> bool:
    """True the first time any process of this server asks (a process that mapped the page
    itself, after the fork, counts on its own)."""
    flags = notices()
    if flags[0]:
        return False
    flags[0] = 1
    return True


def not_listening(exc: BaseException) -> bool:
    """ECONNREFUSED: the collector's host answered that nobody listens there (ICMP port
    unreachable, or a unix socket nobody has bound). A collector that is not running, or not yet,
    is normal for fire-and-forget gauges, so this is never reported; the metrics go out again as
    soon as it listens. Anything else (a name that does not resolve, no route, no such unix
    socket) is a setting to fix, and is reported once."""
    return isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED


def collector_problem(emit: Any, target: str, exc: BaseException) -> None:
    if not_listening(exc):
        return
    if first_report():
        emit(
            "statsd: cannot send to %s (%s: %s); metrics are dropped until it is back, and this "
            "is not logged again",
            target,
            type(exc).__name__,
            exc,
        )
