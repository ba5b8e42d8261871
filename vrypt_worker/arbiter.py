"""Everything vrypt_worker does inside gunicorn's arbiter process, in one place.

gunicorn runs code of ours in its arbiter at these moments; each is one of gunicorn's server hooks,
which receive the arbiter (`server`) explicitly:

  when (gunicorn 27)                       hook               what it does here
  Arbiter.setup: at start, on HUP with     nworkers_changed   the listener slots (listeners.py),
    the config just read; TTIN, TTOU                          forks without gunicorn's stagger,
                                                              a recycled worker's successor first
  Arbiter.start, before the listeners      on_starting        the control socket named after the
                                                              binds (the package's conf only)
  Arbiter.start, before any fork           check_config       refuse what cannot be honoured,
                                                              choose the answer, start the metrics
  spawn_worker, before each fork           pre_fork           a slot made for the new worker is
                                                              one of gunicorn's listeners too
  HUP, after the conf file ran again       on_reload          the answer chosen again (conf only)

(check_config is the worker class's classmethod, VryptWorker.check_config, not a hook.)

With the package's conf (conf/gunicorn.conf.py, `vrypt-server`: both take vrypt_worker/conf.py's
names) gunicorn calls these hooks because the conf names them. The bare drop-in, `gunicorn -k
vrypt_worker.VryptWorker` with no conf of ours, has nothing that names them: `worker_class_setup`
(VryptWorker.setup, which gunicorn calls from Arbiter.setup just before nworkers_changed) then finds
the arbiter on the call stack, the only code here that does, and adds nworkers_changed to gunicorn's
config. A hook the operator's own conf set is never replaced: ours runs first, then theirs.
"""

from __future__ import annotations

import functools
import gc
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from vrypt_worker import announce, answer, http3, listeners, metrics, reexec, settings, tls

# The gunicorn Arbiter this process runs, once one of our hooks has seen it (None before that,
# and for good where gunicorn never called them: check_config says so).
_server: Any = None
# The config whose Arbiter.setup nworkers_changed last handled: gunicorn makes a new one on HUP.
_setup_cfg: Any = None
_fork_hooked = False


def gunicorn_arbiter() -> Any:
    """The gunicorn Arbiter (the first argument of gunicorn's server hooks, such as worker_exit),
    or None when gunicorn did not let us see it."""
    return _server


# --- gunicorn's server hooks -------------------------------------------------------------------


def nworkers_changed(server: Any, new_value: int, old_value: int | None) -> None:
    """gunicorn calls it from Arbiter.setup (at start, and on HUP with the config just read again)
    before it binds any listener, and on TTIN and TTOU: the way into everything below."""
    global _server, _setup_cfg
    cfg = server.cfg
    if cfg is not _setup_cfg:  # Arbiter.setup, not TTIN/TTOU
        if _setup_cfg is None:  # the start, not a HUP (on_reload keeps the answer on a bad one)
            _refuse_bad_settings(cfg, server.log)  # before anything binds, as for $PORT
        _setup_cfg = cfg
        held = listeners.prepare(cfg, server.log, bool(server.LISTENERS))
        if held is not None:
            server.LISTENERS = held
        chain_hook(cfg, "pre_fork", pre_fork)
    listeners.want_workers(new_value)
    if server is not _server:  # once per arbiter (a USR2 upgrade is a new process)
        _server = server
        reexec.start_as_started(server)  # USR2 re-executes `python -m gunicorn` as started
        announce.listening_once(server.log)  # `Listening at:` names each address once
        _freeze_heap_at_fork()
        _spawn_replacements_at_once(server)


def pre_fork(server: Any, worker: Any) -> None:
    """Right after VryptWorker.__init__ took its slot (listeners.assign): a slot added for it
    (TTIN, a HUP) joins gunicorn's listeners, so that a USR2 upgrade inherits every slot."""
    if listeners.slot_mode():
        server.LISTENERS = listeners.held_listeners()


def on_starting(server: Any) -> None:
    """One control socket per server. gunicorn 27's default path ($XDG_RUNTIME_DIR/gunicorn.ctl,
    else ~/.gunicorn/gunicorn.ctl) is the same for every server a user starts: the second takes it
    over and stopping either deletes it. Unless control_socket was set, it becomes one that names
    this server's binds, e.g. vrypt-8080.ctl in the same directory. This hook runs in the arbiter
    with the final settings (the command line's --bind included), before the socket is created.
    A conf that defines its own on_starting can call this one."""
    cfg = server.cfg
    if cfg.control_socket_disable or cfg.control_socket != cfg.settings["control_socket"].default:
        return
    plain = path = settings.control_socket_path(cfg.address, cfg.control_socket)
    if _socket_in_use(path):
        # Another live server with the same binds (two SO_REUSEPORT servers can share a port):
        # never take its socket over. gunicorn announces the path it listens at.
        path = settings.control_socket_path(cfg.address, cfg.control_socket, os.getpid())
        if server.master_pid:  # a USR2 upgrade: the plain name is ours again once promoted
            reexec.plain_control_socket_at_promotion(server, plain, _socket_in_use)
    cfg.set("control_socket", path)


def on_reload(server: Any) -> None:
    """HUP, after gunicorn ran the conf file again and before it forks the new workers: choose
    the answer again, so that editing `vrypt_status` & co. and sending HUP switches a running
    server (to a maintenance page, say). A bad value is logged and the answer stays what it was:
    a reload must not take the server down. A conf that defines its own on_reload can call this
    one."""
    cfg, log = server.cfg, server.log
    try:
        chosen = answer.from_settings(answer.conf_namespace(cfg.config))
    except settings.SettingError as exc:
        log.error("vrypt_worker keeps its answer, the reloaded settings are bad: %s", exc)
        return
    if chosen != answer.active():
        answer.activate(chosen)
        log.info(
            "vrypt_worker now answers %d %s: %d-byte body, %d extra header lines",
            chosen.status,
            chosen.reason.decode("ascii"),
            len(chosen.body),
            len(chosen.headers),
        )


# --- at start, before any fork (VryptWorker.check_config) ----------------------------------------


def check_config(cfg: Any, log: Any) -> None:
    """Once per server, in Arbiter.start before any worker: refuse what we cannot honour."""
    refused = []
    if cfg.is_ssl:
        try:  # made here, in the arbiter, so that every worker shares its ticket keys
            tls.context_for(cfg)
        except Exception as exc:
            refused.append(
                "TLS settings that cannot be loaded (certfile, keyfile, ca_certs, ciphers, "
                f"ssl_context): {exc}"
            )
    if cfg.protocol not in ("http", "uwsgi"):
        refused.append(f"protocol={cfg.protocol}: only http and uwsgi are served")
    if cfg.reuse_port and any(not isinstance(address, tuple) for address in cfg.address):
        # gunicorn sets SO_REUSEPORT on every listener it creates; unix sockets refuse it and
        # inherited descriptors are ignored, so the worker would loop on errors instead.
        refused.append(
            "reuse_port with a unix: or fd:// bind: set VRYPT_REUSE_PORT=0 (one shared "
            "listener) for unix sockets and inherited descriptors"
        )
    if refused:
        raise RuntimeError(
            "vrypt_worker.VryptWorker cannot honour these settings: " + "; ".join(refused)
        )
    # A bad VRYPT_* variable or answer setting stops the start in the arbiter, with a message
    # naming it (exit 2), instead of failing in every worker: before the binds (nworkers_changed),
    # or here when that hook did not run; the chosen answer is inherited by every worker.
    _check_settings(cfg, log)
    if _server is None:
        log.warning(
            "vrypt_worker did not see gunicorn's arbiter (a conf replaced the nworkers_changed "
            "hook of vrypt_worker.conf without calling vrypt_worker.arbiter.nworkers_changed, or "
            "gunicorn is not 27.x): no listener slots, and gunicorn's staggered forks"
        )
    if cfg.reuse_port and not settings.tcp_migrate_req_enabled():
        # Only where the arbiter could not hold the listeners (systemd's sockets with
        # reuse_port): then every worker binds its own, and its exit resets its queue.
        log.warning(
            "reuse_port is on with listeners each worker binds itself, and "
            "net.ipv4.tcp_migrate_req is not 1: connections still queued on a worker's "
            "listener when it exits are reset by the kernel. Set VRYPT_REUSE_PORT=0 with "
            "systemd sockets; see docs/reliability.md"
        )
    if listeners.slot_mode():
        # `Listening at:` counts each address's listeners (announce.py): say why there are many.
        log.info(
            "vrypt_worker: one SO_REUSEPORT listener per worker on each address, kept by "
            "the arbiter so that restarts never leave the port without one "
            "(VRYPT_REUSE_PORT=0 for a single shared listener)"
        )
    if _server is not None:
        announce.families_served(_server.LISTENERS, log)  # IPv6 and IPv4, or why not
    metrics.start(cfg, log)  # shared counter slots and the StatsD pusher, before any fork


def _decide_http3(cfg: Any, log: Any) -> None:
    """HTTP/3 on or off (http3.py), once the listeners are bound (a port 0 bind resolved):
    refuse what cannot be honoured (exit 2, the setting named), and say where it answers."""
    try:
        quic = http3.decide(cfg, listeners.bound_addresses() or cfg.address)
    except settings.SettingError as exc:
        log.error("vrypt_worker cannot start: %s", exc)
        sys.exit(settings.EXIT_BAD_SETTING)
    if quic is not None:
        log.info(
            "vrypt_worker: HTTP/3 on, at %s (%s); answers over TLS carry %s",
            quic.describe(),
            "one SO_REUSEPORT UDP socket per worker slot"
            if listeners.slot_mode()
            else "each worker binds its own SO_REUSEPORT UDP socket",
            quic.alt_svc.decode("ascii"),
        )


def _refuse_bad_settings(cfg: Any, log: Any) -> answer.Answer:
    """Refuse a bad variable or answer setting (exit 2, the setting named in the log), else
    choose the answer every worker inherits. From nworkers_changed at the start, before any
    listener is bound (so no `Listening at:` line makes a refused start look started), and from
    check_config (for a start whose hooks never ran)."""
    try:
        settings.check_worker_environment()
        settings.check_bind_ports(cfg.address)
        chosen = answer.from_settings(answer.conf_namespace(cfg.config))
    except settings.SettingError as exc:
        log.error("vrypt_worker cannot start: %s", exc)
        sys.exit(settings.EXIT_BAD_SETTING)
    answer.activate(chosen)
    return chosen


def _check_settings(cfg: Any, log: Any) -> None:
    """The operators' settings: refuse a bad one, choose the answer every worker inherits, and
    say only what the operator set and can act on."""
    # Checked already when nworkers_changed saw this config (the start, before the binds).
    chosen = answer.active() if cfg is _setup_cfg else _refuse_bad_settings(cfg, log)
    _decide_http3(cfg, log)
    if chosen != answer.DEFAULT:
        log.info(
            "vrypt_worker answers %d %s: %d-byte body, %d extra header lines",
            chosen.status,
            chosen.reason.decode("ascii"),
            len(chosen.body),
            len(chosen.headers),
        )
    # The conf's default worker_connections fits the hard limit (fitting_worker_connections), so
    # this says something only about a value the operator chose; once, not once per worker.
    fits = settings.fitting_worker_connections(cfg.worker_connections)
    if cfg.worker_connections > fits:
        log.warning(
            "worker_connections=%d does not fit the hard open-file limit %d (at most %d with the "
            "worker's own descriptors): accepts back off when descriptors run out. Lower "
            "worker_connections or raise the limit (ulimit -Hn, systemd LimitNOFILE=)",
            cfg.worker_connections,
            settings.nofile_hard_limit(),
            fits,
        )
    # Only about an application the operator named: an APP_MODULE argument (gunicorn makes it
    # the default process name) or a wsgi_app of their own conf, not the package's.
    named = cfg.default_proc_name if cfg.default_proc_name != "gunicorn" else cfg.wsgi_app
    if named and named != settings.OWN_WSGI_APP:
        log.info(
            "vrypt_worker answers every request itself: the application %r is never imported "
            "or called (unless preload_app imports it in the arbiter)",
            named,
        )


# --- the drop-in's way in ----------------------------------------------------------------------


def worker_class_setup() -> None:
    """VryptWorker.setup(): gunicorn calls it from Arbiter.setup (at start, and on HUP with the
    config just read again), right before that method calls the nworkers_changed hook. Makes
    sure that the hook gunicorn is about to call is ours."""
    server = _server
    if server is None:  # the start
        if _is_ours(_loaded_conf_hook("nworkers_changed"), nworkers_changed):
            return  # the package's conf: gunicorn calls our hook next, with the arbiter
        server = _arbiter_on_the_stack()
        if server is None:
            return  # not the Arbiter.setup we know: gunicorn is left alone (check_config warns)
    chain_hook(server.cfg, "nworkers_changed", nworkers_changed)


def _loaded_conf_hook(name: str) -> Any:
    """What the conf file gunicorn loaded names `name` (gunicorn runs a conf file as the module
    `__config__`; `vrypt-server` loads `python:vrypt_worker.conf`), None without a conf."""
    module = sys.modules.get("__config__") or sys.modules.get("vrypt_worker.conf")
    return getattr(module, name, None)


# The one place that looks at the call stack. Checked against gunicorn 27.0.1 (pyproject allows
# >=27.0,<28): Arbiter.setup reads `self.cfg.worker_class`, a Config property that calls the
# worker class's setup() (VryptWorker.setup -> worker_class_setup), and then sets num_workers,
# which calls the nworkers_changed hook. gunicorn offers a worker class no other way to see the
# arbiter before it binds; tests/test_arbiter.py fails, naming what changed, if that order does.
_STACK_SEARCH = 8  # frames: worker_class_setup, VryptWorker.setup, Config.worker_class, ...


def _arbiter_on_the_stack() -> Any:
    """The gunicorn Arbiter whose setup() is running further up the stack, or None."""
    try:
        from gunicorn.arbiter import Arbiter

        setup_code = Arbiter.setup.__code__
        frame = sys._getframe(1)
    except (ImportError, AttributeError, ValueError):
        return None
    for _ in range(_STACK_SEARCH):
        if frame is None:
            return None
        if frame.f_code is setup_code:
            candidate = frame.f_locals.get("self")
            return candidate if isinstance(candidate, Arbiter) else None
        frame = frame.f_back
    return None


def _is_ours(hook: Any, ours: Callable[..., None]) -> bool:
    return hook is ours or getattr(hook, "__wrapped__", None) is ours


def chain_hook(cfg: Any, name: str, ours: Callable[..., None]) -> None:
    """Make gunicorn's `name` hook call `ours` first, then the one the config held (gunicorn's
    no-op default, or the operator's own): a hook of theirs is never replaced."""
    theirs = cfg.settings[name].get()
    if _is_ours(theirs, ours):
        return

    @functools.wraps(ours)  # __wrapped__: gunicorn checks the hook's arity on `ours`' signature
    def ours_then_theirs(*args: Any) -> None:
        ours(*args)
        theirs(*args)

    cfg.set(name, ours_then_theirs)


# --- what the arbiter does differently ---------------------------------------------------------


def _spawn_replacements_at_once(server: Any) -> None:
    """gunicorn's spawn_workers sleeps up to 0.1 s (at random) after every fork, to stagger
    workers that start together, and handles no signal meanwhile. That sleep delays the next
    replacement: with max_requests 1000 a worker lives a few tens of milliseconds under load, so
    with one worker the port spent most of its time waiting for the arbiter (docs/reliability.md).
    These workers boot in milliseconds and their listeners need no staggering (SO_REUSEPORT
    slots, no accept herd), so the arbiter forks every missing worker at once. No hook reaches
    inside spawn_workers: the method is replaced on this arbiter object."""

    def spawn_workers() -> None:
        for _ in range(server.num_workers - len(server.WORKERS)):
            server.spawn_worker()

    server.spawn_workers = spawn_workers
    if listeners.slot_mode():
        # max_requests: the successor is forked before the old worker stops serving its slot
        server.manage_workers = _successors_first(server, server.manage_workers)


def _successors_first(server: Any, manage_workers: Callable[[], None]) -> Callable[[], None]:
    """The arbiter's manage_workers, wrapped: first fork the successor of every worker that
    asked for one (in its slot, listeners.want_successor), then let gunicorn's own
    manage_workers count the workers with the ones waiting for their successors left out, so
    that it neither kills a serving worker (it kills the oldest beyond num_workers) nor forks a
    second replacement."""
    succeeded: set[int] = set()

    def manage() -> None:
        if not listeners.slot_mode():
            manage_workers()
            return
        succeeded.intersection_update(server.WORKERS)
        for slot, pid in listeners.successor_requests():
            if pid in server.WORKERS and pid not in succeeded:
                succeeded.add(pid)
                with listeners.next_worker_in(slot):
                    server.spawn_worker()
        leaving = {pid: server.WORKERS.pop(pid) for pid in succeeded if pid in server.WORKERS}
        try:
            manage_workers()
        finally:
            server.WORKERS.update(leaving)

    return manage


def _freeze_heap_at_fork() -> None:
    """Every fork of the arbiter hands its objects to the worker in the garbage collector's
    permanent generation (gc.freeze), and takes them back right after (gc.unfreeze), so that the
    arbiter still collects its own garbage. A worker's collections then never walk the objects it
    inherited: walking them writes their GC headers, which copies every page they live on out of
    the memory shared with the arbiter (docs/performance.md, "Memory")."""
    global _fork_hooked
    if not _fork_hooked:
        os.register_at_fork(before=gc.freeze, after_in_parent=gc.unfreeze)
        _fork_hooked = True


def _socket_in_use(path: str) -> bool:
    """Whether a live server answers on the unix socket at `path` (a stale file does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True
