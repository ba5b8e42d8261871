"""HTTP/3's plan for this server, decided once in the arbiter: on or off, where, with what.

`VRYPT_HTTP3` (or `vrypt_http3 = True` in a conf file; the environment wins, settings.py) switches
it on. It is refused unless gunicorn's TLS settings are on (certfile and keyfile: QUIC is TLS 1.3
only) and aioquic imports (the `http3` extra); every bind must be a host and port (UDP cannot
serve a unix socket or an inherited descriptor). Then each TCP bind gets a UDP twin on the same
host and port, and every answer over TLS (HTTP/1.1 and h2) carries `Alt-Svc: h3=":PORT"` through
the answer (`advertised`), so browsers move over.

UDP sockets: like the TCP listener slots (listeners.py), one SO_REUSEPORT UDP socket per address
for each worker slot, made in the arbiter (at the first fork into the slot) and kept by it, so a
replaced worker's successor reads the same socket: the datagrams that arrive in between wait in
its queue, and the group's size (hence the kernel's hash of a flow to a socket) does not change
as workers come and go. Without slots (VRYPT_REUSE_PORT=0, systemd's sockets) each worker binds
its own after the fork: then every exit and start changes the group, the kernel's hash moves
flows between sockets, and a connection whose datagrams land on another worker is lost (the
client times out and reconnects); docs/http3.md.

This module holds no QUIC: the arbiter builds aioquic's configuration through h3/ only when HTTP/3
is on, so aioquic stays optional.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import Any

from vrypt_worker import answer, listeners, settings
from vrypt_worker.answer import Answer


@dataclass(frozen=True)
class Plan:
    """HTTP/3 on: the UDP addresses (the TCP binds'), and aioquic's server configuration."""

    addresses: tuple[tuple[str, int], ...]
    configuration: Any  # aioquic.quic.configuration.QuicConfiguration

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(port for _host, port in self.addresses))

    @property
    def alt_svc(self) -> bytes:
        """`Alt-Svc: h3=":8443"` (one alternative per port; the host is the request's)."""
        return b"Alt-Svc: " + b", ".join(b'h3=":%d"' % port for port in self.ports)

    def describe(self) -> str:
        return ", ".join(_format(address) for address in self.addresses)


_plan: Plan | None = None
_slots: dict[int, list[socket.socket]] = {}


def active() -> Plan | None:
    """HTTP/3's plan (None: off); decided in the arbiter, inherited by every worker."""
    return _plan


def decide(cfg: Any, addresses: list[Any]) -> Plan | None:
    """In the arbiter (check_config): HTTP/3's plan from the settings, or SettingError naming
    the setting that cannot be honoured. `addresses` are the binds as listened on (a port 0
    bind already resolved by the listener slots)."""
    global _plan
    conf = answer.conf_namespace(cfg.config)
    if not settings.http3_wanted(conf):
        _plan = None
        return None
    name = "$VRYPT_HTTP3" if os.environ.get("VRYPT_HTTP3", "").strip() else "vrypt_http3"
    if not cfg.is_ssl:
        raise settings.SettingError(
            name,
            "HTTP/3 needs TLS: set certfile and keyfile (QUIC carries TLS 1.3 only); HTTP/3 "
            "answers on UDP on the port of each TLS bind",
        )
    if any(not isinstance(address, tuple) for address in addresses):
        raise settings.SettingError(
            name, "HTTP/3 needs host:port binds (no unix: or fd:// bind can carry UDP)"
        )
    try:
        from vrypt_worker.h3.endpoint import server_configuration
    except ImportError as exc:
        raise settings.SettingError(
            name, f"HTTP/3 needs aioquic (pip install 'vrypt-worker[http3]'): {exc}"
        ) from None
    try:
        configuration = server_configuration(cfg.certfile, cfg.keyfile, max(cfg.keepalive, 1))
    except Exception as exc:
        raise settings.SettingError(name, f"QUIC cannot load certfile/keyfile: {exc}") from None
    udp = tuple((str(host), int(port)) for host, port, *_ in addresses)
    for address in udp:
        _refuse_a_taken_port(name, address)
    _plan = Plan(udp, configuration)
    return _plan


def _refuse_a_taken_port(name: str, address: tuple[str, int]) -> None:
    """Another process on the UDP port fails the start here, in the arbiter (a SO_REUSEPORT
    socket of ours would join its group and split its traffic, or fail to bind in a fork)."""
    host, port = address
    if port == 0 or os.environ.get("GUNICORN_PID"):
        return  # a port chosen by the kernel; a USR2 upgrade, whose parent holds the port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise settings.SettingError(
                name, f"HTTP/3 cannot bind UDP {_format(address)}: {exc.strerror or exc}"
            ) from None


def advertised(chosen: Answer, plan: Plan | None) -> Answer:
    """The answer over TCP: with HTTP/3 on, it names the UDP port (Alt-Svc) unless the
    operator's own header lines say something else already."""
    if plan is None or any(line.lower().startswith(b"alt-svc:") for line in chosen.headers):
        return chosen
    return dataclasses.replace(chosen, headers=(*chosen.headers, plan.alt_svc))


def bind_udp(address: tuple[str, int]) -> socket.socket:
    """One non-blocking SO_REUSEPORT UDP socket on `address`."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# Steering (issue 23): the server's connection IDs begin with the worker's slot (two bytes,
# h3/session.py), and a classic BPF program attached to each address's UDP reuseport group picks
# the socket at that index for every short-header packet (the packets after the handshake, whose
# destination ID is always one the server issued), whatever the client's address and port. Long
# headers (Initial, Handshake, 0-RTT: the client's address cannot change before the handshake is
# confirmed, RFC 9000 §9) get an index beyond the group, and the kernel falls back to its hash
# of the addresses. The group's sockets are the slots' in order (each is bound at the first fork
# into its slot, and the arbiter never closes one), so the index of a slot's socket is the slot.
# nginx's `quic_bpf` does the same with an eBPF program.
SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>; not in Python's socket module
_BPF_LD_B_ABS, _BPF_LD_H_ABS, _BPF_JSET_K, _BPF_RET_A, _BPF_RET_K = 0x30, 0x28, 0x45, 0x16, 0x06
STEERING_PROGRAM = (
    (_BPF_LD_B_ABS, 0, 0, 0),  # A = the first byte of the UDP payload (the QUIC header form)
    (_BPF_JSET_K, 2, 0, 0x80),  # a long header: to the hash
    (_BPF_LD_H_ABS, 0, 0, 1),  # A = the destination connection ID's first two bytes: the slot
    (_BPF_RET_A, 0, 0, 0),
    (_BPF_RET_K, 0, 0, 0xFFFFFFFF),  # beyond the group: the kernel's hash
)
CID_PREFIX_BYTES = 2


def cid_prefix(slot: int) -> bytes:
    """The first bytes of every connection ID a worker serving `slot` issues."""
    return slot.to_bytes(CID_PREFIX_BYTES, "big")


def attach_steering(sock: socket.socket) -> None:
    """Attach STEERING_PROGRAM to the reuseport group `sock` belongs to (Linux; unprivileged)."""
    import ctypes

    class Filter(ctypes.Structure):
        _fields_ = (
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        )

    class Program(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter)))

    filters = (Filter * len(STEERING_PROGRAM))(*(Filter(*op) for op in STEERING_PROGRAM))
    program = Program(len(STEERING_PROGRAM), filters)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(program))


def slot_sockets(slot: int) -> list[socket.socket]:
    """In the arbiter (VryptWorker.__init__, before its fork): the UDP sockets of listener slot
    `slot`, made the first time a worker takes it and kept for every later one. The first
    slot's sockets carry the steering program for their groups."""
    plan = _plan
    if plan is None or slot < 0:
        return []
    # Bound in slot order, so that each slot's socket sits at its slot's index in the group.
    for missing in range(len(_slots), slot + 1):
        made = _slots[missing] = [bind_udp(address) for address in plan.addresses]
        if missing == 0:
            for sock in made:
                attach_steering(sock)
    return _slots[slot]


def held_sockets(slot: int) -> list[socket.socket]:
    """In a worker: the UDP sockets of another slot, inherited at the fork (to adopt it while
    nobody serves it); none for a slot made after this worker was forked."""
    return _slots.get(slot, [])


def adopts(mine: int, orphan: int, slots: Any) -> bool:
    """Whether the worker serving slot `mine` reads the UDP sockets of `orphan` while nobody
    serves it: only one worker may (two readers of one UDP socket each lose what the other
    reads), the one serving the lowest slot still served (`slots`: the other slots it knows)."""
    arbiter_pid = os.getppid()
    return not any(
        other < mine and other != orphan and not listeners.orphaned(other, arbiter_pid)
        for other in slots
    )


def own_sockets() -> list[socket.socket]:
    """In a worker without listener slots: its own UDP sockets, bound after the fork."""
    plan = _plan
    return [] if plan is None else [bind_udp(address) for address in plan.addresses]


def _format(address: tuple[str, int]) -> str:
    host, port = address
    return f"udp://[{host}]:{port}" if ":" in host else f"udp://{host}:{port}"
