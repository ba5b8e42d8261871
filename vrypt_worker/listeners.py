"""SO_REUSEPORT listeners that outlive the workers: one slot of listeners per worker, held by the
arbiter, so that the port never has a gap while workers come and go.

gunicorn 27 with `reuse_port` lets each worker bind its own listener after the fork, and the
arbiter holds none. A worker that exits then closes the only socket its share of the traffic can
reach: the kernel resets what waits in that socket's queue (unless net.ipv4.tcp_migrate_req is 1,
which Kubernetes does not allow in an unprivileged pod), and with one worker, or with every worker
recycling at once, the port has no listener at all and connections are refused. docs/reliability.md
has the measurements.

Here, as nginx does with `reuseport`, the arbiter creates the listeners (one per bind address for
each worker slot) before it forks and keeps them open for as long as it lives. Each worker serves
its own slot. A worker that exits closes only its copy of the descriptor: the socket, its place in
the SO_REUSEPORT group and its queue live on in the arbiter, and the replacement worker inherits
the same socket. A connection that arrives in between waits in the queue for a few milliseconds;
it is never refused or reset. A slot whose worker is gone and not replaced (TTOU, a worker killed
by the arbiter's timeout while the replacement boots) is adopted by the other workers until a
worker takes it again: `owners` in shared memory says who serves each slot.

The arbiter hands the listeners to gunicorn as its own (`Arbiter.LISTENERS`), which makes gunicorn
do the right thing everywhere else: it names them in `Listening at:`, passes them to a USR2
upgrade (GUNICORN_FD), whose arbiter adopts them as its slots (the same sockets: an upgrade
changes nothing in the kernel), and closes its copies first on TERM. gunicorn's own per-worker
binding is switched off by setting `reuse_port` to False in the arbiter's config once the slots
exist; `slot_mode()` is what the worker reads instead.

This module holds the slots' mechanics (the sockets, the shared `owners` words, claim and release);
it never sees gunicorn's Arbiter object: arbiter.py calls it from gunicorn's hooks and hands
gunicorn what it returns.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gunicorn import sock as gsock

from vrypt_worker import families
from vrypt_worker.metrics import alive_child

MAX_SLOTS = 512  # far above any worker count
# A slot whose owner has not said "mine" (every 0.25 s clock tick) for this long is adopted too:
# its worker is alive but stuck (blocked, stopped, starved), and gunicorn's `timeout` may take 30 s
# to replace it while the connections on its listener wait.
STALE_AFTER = 1.0

_pool: SlotPool | None = None


class _ConfView:
    """The arbiter's config with `reuse_port` overridden, for gunicorn's socket classes."""

    def __init__(self, cfg: Any, reuse_port: bool) -> None:
        self._cfg = cfg
        self.reuse_port = reuse_port

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)


class SlotPool:
    """The arbiter's listener slots. Built in the arbiter before any worker forks."""

    def __init__(self, addresses: list[tuple[Any, ...]], owners: memoryview) -> None:
        self.addresses = addresses
        self.slots: list[list[Any]] = []  # gunicorn listener objects, one per address
        self.holders: dict[int, list[Any]] = {}  # slot -> worker objects given that slot
        # shared: owners[slot] = pid of the worker that serves it, or 0;
        # owners[MAX_SLOTS + slot] = when it last said so (CLOCK_MONOTONIC, ms: one clock for all
        # processes of the machine); owners[2 * MAX_SLOTS + slot] = pid of a worker that has
        # reached max_requests and asks for its successor (`want_successor`), or 0
        self.owners = owners
        self.successor_slot: int | None = None  # the next worker's slot, set by the arbiter
        # The arbiter's num_workers (its nworkers_changed hook): slots are added up to it (TTIN).
        self.wanted = 1

    @property
    def listeners(self) -> list[Any]:
        return [listener for slot in self.slots for listener in slot]

    def add_slot(self, cfg: Any, log: Any) -> int:
        if len(self.slots) >= MAX_SLOTS:
            raise RuntimeError(f"vrypt_worker: more than {MAX_SLOTS} listener slots")
        view = _ConfView(cfg, True)
        self.slots.append([_listener(addr, view, log) for addr in self.addresses])
        return len(self.slots) - 1

    def live_holders(self, slot: int, arbiter_pid: int) -> int:
        alive = [
            worker
            for worker in self.holders.get(slot, [])
            if not isinstance(worker.pid, int) or alive_child(worker.pid, arbiter_pid)
        ]
        self.holders[slot] = alive
        return len(alive)

    def assign(self, worker: Any, wanted: int, cfg: Any, log: Any) -> int:
        """The slot for a new worker: one nobody holds; else a new one while there are fewer
        slots than workers wanted (TTIN); else share the least held (a HUP reload forks the new
        workers before the old ones leave: each new one shares an old one's slot)."""
        me = os.getpid()
        counts = [self.live_holders(slot, me) for slot in range(len(self.slots))]
        if 0 in counts:
            slot = counts.index(0)
        elif len(self.slots) < wanted:
            slot = self.add_slot(cfg, log)
        else:
            slot = counts.index(min(counts))
        self.holders.setdefault(slot, []).append(worker)
        return slot


class _DualStack(gsock.TCP6Socket):
    """A `[::]` listener that serves IPv4 clients too: IPV6_V6ONLY off before the bind, whatever
    the kernel's default (families.py)."""

    def bind(self, sock: socket.socket) -> None:
        families.serve_both(sock)
        super().bind(sock)


def _listener(address: tuple[Any, ...], view: _ConfView, log: Any) -> Any:
    kind = gsock._sock_type(address)
    if kind is gsock.TCP6Socket and address[0] == families.ANY_V6:
        kind = _DualStack
    return kind(address, view, log)


def slot_mode() -> bool:
    """True when this server's listeners are arbiter-held SO_REUSEPORT slots."""
    return _pool is not None


def _tcp_addresses(cfg: Any) -> list[tuple[Any, ...]] | None:
    addresses = cfg.address
    if not addresses or any(not isinstance(address, tuple) for address in addresses):
        return None  # unix: and fd:// binds: refused with reuse_port by check_config
    return list(addresses)


def _refuse_a_taken_port(cfg: Any, log: Any) -> None:
    """Another process listening on the port fails the start, as it does for gunicorn's own
    workers. A SO_REUSEPORT listener of ours would silently join that process's group (another
    vrypt-server left running, say) and split its traffic, so first bind plainly, through
    gunicorn's own code: its messages, its five tries, its exit status."""
    for listener in gsock.create_sockets(_ConfView(cfg, False), log):
        listener.close()


def _adopt_inherited(cfg: Any, log: Any, fds: list[int], per_slot: int) -> list[list[Any]]:
    listeners = gsock.create_sockets(_ConfView(cfg, True), log, fds)
    if per_slot < 1 or len(listeners) % per_slot:
        per_slot = 1
    return [listeners[i : i + per_slot] for i in range(0, len(listeners), per_slot)]


def prepare(cfg: Any, log: Any, listening: bool) -> list[Any] | None:
    """From Arbiter.setup (arbiter.nworkers_changed), at start and at every reload: build the
    slots (or adopt a USR2 parent's) and switch gunicorn's per-worker binding off. Returns the
    listeners gunicorn must hold as its own (`Arbiter.LISTENERS`), or None to leave gunicorn's
    alone (`listening`: gunicorn holds listeners of its own already)."""
    global _pool
    if _pool is not None:  # a reload: same sockets, and gunicorn's binding off again
        if cfg.address != _pool.addresses and cfg.reuse_port:
            log.warning(
                "vrypt_worker: a changed bind (%s) takes effect at the next restart or USR2 "
                "upgrade; the listeners stay on %s",
                ",".join(map(str, cfg.address)),
                ",".join(map(str, _pool.addresses)),
            )
            cfg.set("bind", [_format(address) for address in _pool.addresses])
        cfg.set("reuse_port", False)
        return _pool.listeners
    if not cfg.reuse_port or not hasattr(socket, "SO_REUSEPORT") or listening:
        return None
    if os.environ.get("LISTEN_FDS"):
        return None  # systemd socket activation: its sockets, gunicorn's way
    addresses = _tcp_addresses(cfg)
    if addresses is None:
        return None
    page = mmap.mmap(-1, 3 * MAX_SLOTS * 8)
    new = SlotPool(addresses, memoryview(page).cast("Q"))
    new.wanted = max(int(cfg.workers or 1), 1)
    inherited = os.environ.pop("GUNICORN_FD", "") if os.environ.get("GUNICORN_PID") else ""
    if inherited:
        fds = [int(fd) for fd in inherited.split(",") if fd]
        new.slots = _adopt_inherited(cfg, log, fds, len(addresses))
    else:
        _refuse_a_taken_port(cfg, log)
    if not new.slots:
        new.add_slot(cfg, log)
        # A port 0 bind: every slot must join the port the first one got.
        new.addresses = [
            (address[0], listener.getsockname()[1], *address[2:])
            for address, listener in zip(addresses, new.slots[0], strict=True)
        ]
        for _ in range(1, new.wanted):
            new.add_slot(cfg, log)
    _pool = new
    cfg.set("reuse_port", False)
    return new.listeners


def want_workers(count: int) -> None:
    """In the arbiter: the number of workers it keeps now (at start, on HUP, TTIN, TTOU)."""
    if _pool is not None:
        _pool.wanted = max(count, 1)


def bound_addresses() -> list[tuple[Any, ...]] | None:
    """In the arbiter: the slots' addresses (a port 0 bind resolved), None without slots."""
    return list(_pool.addresses) if _pool is not None else None


def held_listeners() -> list[Any]:
    """In the arbiter: every slot's listeners, for gunicorn's LISTENERS (a USR2 upgrade gets them
    all, a slot added for a new worker too)."""
    return _pool.listeners if _pool is not None else []


def _format(address: tuple[Any, ...]) -> str:
    host = address[0]
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


def assign(worker: Any) -> tuple[int, list[Any], dict[int, list[Any]]]:
    """In the arbiter, from VryptWorker.__init__: (slot, its listeners, the other slots).

    The worker inherits every slot's descriptors at the fork; it serves its own and adopts the
    others' when their owner is gone (`orphaned`)."""
    current = _pool
    assert current is not None
    if current.successor_slot is not None:
        slot, current.successor_slot = current.successor_slot, None
        current.holders.setdefault(slot, []).append(worker)
    else:
        slot = current.assign(worker, current.wanted, worker.cfg, worker.log)
    others = {k: listeners for k, listeners in enumerate(current.slots) if k != slot}
    return slot, current.slots[slot], others


def claim(slot: int, first: bool = False) -> None:
    """In the worker: this process serves `slot` now (written again on every clock tick, so a
    predecessor that cleared the word while leaving cannot undo it for long). The `first` claim
    tells a predecessor still serving the slot (a recycled worker waiting for us) at once."""
    if _pool is None:
        return
    previous = _pool.owners[slot]
    _pool.owners[MAX_SLOTS + slot] = _now_ms()
    _pool.owners[slot] = os.getpid()
    if first and previous not in (0, os.getpid()) and alive_child(previous, os.getppid()):
        try:
            os.kill(previous, signal.SIGWINCH)
        except OSError:
            pass


def want_successor(slot: int) -> None:
    """In a worker that reached max_requests: ask the arbiter to fork our successor now, while
    we keep serving the slot, instead of after we have exited (gunicorn's order, which leaves the
    slot unserved for the exit, the reaping and the boot: about 15 ms per recycle). SIGCHLD wakes
    the arbiter's loop, whose manage_workers (arbiter.py) reads the request."""
    if _pool is None:
        return
    _pool.owners[2 * MAX_SLOTS + slot] = os.getpid()
    try:
        os.kill(os.getppid(), signal.SIGCHLD)
    except OSError:
        pass


def successor_requests() -> Iterator[tuple[int, int]]:
    """In the arbiter: (slot, pid) of each worker that has asked for its successor
    (`want_successor`) since the last look; each request is cleared as it is handed out."""
    current = _pool
    if current is None:
        return
    base = 2 * MAX_SLOTS
    for slot in range(len(current.slots)):
        pid = current.owners[base + slot]
        if pid:
            current.owners[base + slot] = 0
            yield slot, pid


@contextmanager
def next_worker_in(slot: int) -> Iterator[None]:
    """In the arbiter: the worker made inside this block (VryptWorker.__init__ calls `assign`)
    takes `slot`, the one its predecessor still serves."""
    assert _pool is not None
    _pool.successor_slot = slot
    try:
        yield
    finally:
        _pool.successor_slot = None


def release(slot: int) -> None:
    """In the worker: it stops accepting on `slot`; the others adopt it until its replacement
    claims it. They are told at once (SIGWINCH, which a worker takes as "look at the slots"), so
    the slot's queue waits microseconds for them rather than up to a clock tick."""
    if _pool is None or _pool.owners[slot] != os.getpid():
        return
    _pool.owners[slot] = 0
    for other in set(_pool.owners[: len(_pool.slots)]):
        # alive_child: a dead worker's pid may belong to some other process by now
        if other not in (0, os.getpid()) and alive_child(other, os.getppid()):
            try:
                os.kill(other, signal.SIGWINCH)
            except OSError:
                pass  # gone: its replacement reads the table when it starts


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def _serving(owner: int, slot: int, arbiter_pid: int) -> bool:
    """`owner` is a live worker that has said "mine" lately (not stuck)."""
    assert _pool is not None
    fresh = _now_ms() - _pool.owners[MAX_SLOTS + slot] <= STALE_AFTER * 1000
    return fresh and alive_child(owner, arbiter_pid)


def served_by_another(slot: int, arbiter_pid: int) -> bool:
    """Another live worker has claimed `slot` (a HUP reload's successor of a leaving worker)."""
    owner = _pool.owners[slot] if _pool is not None else 0
    return owner not in (0, os.getpid()) and _serving(owner, slot, arbiter_pid)


def orphaned(slot: int, arbiter_pid: int) -> bool:
    """Nobody serves `slot`: no owner, an owner that is gone (killed, exited), or one that has
    not said "mine" for STALE_AFTER (stuck)."""
    owner = _pool.owners[slot] if _pool is not None else 0
    return owner == 0 or (owner != os.getpid() and not _serving(owner, slot, arbiter_pid))
