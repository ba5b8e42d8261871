"""The default bind serves both address families: `[::]` with IPV6_V6ONLY off, so that one
listener answers IPv6 clients and IPv4 ones (as `::ffff:a.b.c.d`), falling back to `0.0.0.0`
where the kernel has no IPv6 sockets at all.

`0.0.0.0` alone leaves `[::1]` and every IPv6 address unanswered: on an IPv6-only or dual-stack
Kubernetes cluster the pod's own address may be IPv6. Where IPv6 is only switched off by sysctl
(`net.ipv6.conf.all.disable_ipv6=1`, common in containers) a `[::]` socket can still be made and
bound, and it still serves IPv4: the fallback is for kernels without IPv6 (`ipv6.disable=1`),
where AF_INET6 sockets cannot be created. The choice is probed once, with a socket that binds
port 0 of `::` (nothing listens, nothing is taken).

IPV6_V6ONLY is set off explicitly on the listeners the arbiter creates (listeners.py), rather
than left to the kernel's default (`net.ipv6.bindv6only`, 0 on Linux unless an operator changed
it). What each wildcard listener really serves is read back from the socket and said at start
(`describe`).
"""

from __future__ import annotations

import functools
import socket
from typing import Any

ANY_V4 = "0.0.0.0"
ANY_V6 = "::"


def serve_both(sock: socket.socket) -> bool:
    """Turn IPV6_V6ONLY off on an AF_INET6 socket not yet bound; whether it took."""
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def dual_stack_available() -> bool:
    """Whether a `[::]` listener can serve both families on this machine."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            if not serve_both(probe):
                return False
            probe.bind((ANY_V6, 0))
            return True
    except OSError:
        return False


def default_host() -> str:
    """The host of the default bind, in gunicorn's bind syntax: `[::]` or `0.0.0.0`."""
    return f"[{ANY_V6}]" if dual_stack_available() else ANY_V4


def default_bind(port: int) -> str:
    return f"{default_host()}:{port}"


def describe(listener: Any) -> str | None:
    """What a wildcard TCP listener serves, for the log at start; None for any other."""
    sock = getattr(listener, "sock", listener)
    try:
        family = sock.family
        host, port = sock.getsockname()[:2]
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    if family == socket.AF_INET and host == ANY_V4:
        v6 = "" if dual_stack_available() else " (this machine has no IPv6 sockets)"
        return f"{ANY_V4}:{port} serves IPv4 only{v6}"
    if family == socket.AF_INET6 and host == ANY_V6:
        try:
            only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        except OSError:
            return None
        if only:
            return f"[{ANY_V6}]:{port} serves IPv6 only (IPV6_V6ONLY is on)"
        return (
            f"[{ANY_V6}]:{port} serves IPv6 and IPv4 (IPV6_V6ONLY off; IPv4 clients appear as "
            "::ffff:a.b.c.d)"
        )
    return None
