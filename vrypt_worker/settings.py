"""The environment variables and machine-derived defaults behind conf.py, cli.py and the worker.

Every variable an operator sets is parsed here, once, with an error that names it (SettingError),
so that `gunicorn -c conf/gunicorn.conf.py`, `vrypt-server` and `gunicorn -k
vrypt_worker.VryptWorker` refuse the same bad value with the same message and exit status 2,
before any worker starts, instead of failing later in a worker with a traceback.

A leaf: it imports no other module of this package (tests/test_imports.py), so that the answer,
the conf and the command line can all use it; what runs in the arbiter with these values (the
checks at start, the answer's reload, the control socket) is in arbiter.py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import resource
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

DEFAULT_PORT = 8080
# The application the package's conf names, so that gunicorn needs no APP_MODULE argument.
OWN_WSGI_APP = "vrypt_worker.wsgi:application"
# Open connections per worker asked for by default, before fitting them to the machine.
DEFAULT_WORKER_CONNECTIONS = 50_000
# Descriptors a worker holds besides its connections: listeners, log files, heartbeat, pipes.
NOFILE_RESERVE = 128
# Exit status for a bad setting: argparse's, so that `vrypt-server abc` and `PORT=abc vrypt-server`
# end the same way.
EXIT_BAD_SETTING = 2


class SettingError(ValueError):
    """A value the server cannot use; `name` is the variable or setting the operator set."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def refuse(error: SettingError) -> NoReturn:
    """Stop a start that has no logger yet (conf file, command line) the way argparse does:
    one line on stderr, exit status 2. gunicorn itself reports its config errors on stderr."""
    sys.stderr.write(f"vrypt_worker: error: {error}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_BAD_SETTING)


def parse_port(text: str) -> int:
    """A TCP port as the command line takes it: a decimal number, 1-65535."""
    try:
        port = int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range 1-65535: {port}")
    return port


def _named(name: str, parse: Callable[[str], Any], raw: str, hint: str = "") -> Any:
    try:
        return parse(raw)
    except ValueError as exc:
        message = str(exc)
        # The parsers of other modules start their message with the name, or are int()'s.
        if message.startswith(f"{name}="):
            message = message.split(": ", 1)[-1]
        elif hint:
            message = hint
        raise SettingError(f"${name}={raw!r}", message) from None


def env_port(environ: Mapping[str, str] = os.environ) -> int | None:
    """$PORT, as platforms such as Heroku or Cloud Run set it; None when unset or empty."""
    raw = environ.get("PORT", "")
    return _named("PORT", parse_port, raw) if raw.strip() else None


def _positive_int(text: str) -> int:
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def env_workers(environ: Mapping[str, str] = os.environ) -> int | None:
    """$WEB_CONCURRENCY: the number of workers; None when unset or empty."""
    raw = environ.get("WEB_CONCURRENCY", "")
    return _named("WEB_CONCURRENCY", _positive_int, raw) if raw.strip() else None


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def env_flag(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    raw = environ.get(name, "")
    return _named(name, _flag, raw) if raw.strip() else default


def _statsd_host(text: str) -> str:
    from gunicorn.config import validate_statsd_address

    try:
        validate_statsd_address(text)
    except (TypeError, ValueError):
        raise ValueError("expected host:port or unix://PATH") from None
    return text


def env_statsd_host(environ: Mapping[str, str] = os.environ) -> str | None:
    """$VRYPT_STATSD_HOST: host:port of the StatsD collector; set and empty disables."""
    raw = environ.get("VRYPT_STATSD_HOST")
    if raw is None:
        return "127.0.0.1:8125"
    return _named("VRYPT_STATSD_HOST", _statsd_host, raw) if raw.strip() else None


# --- the worker's limits against slow and greedy clients (issue 14) -----------------------------

DEFAULT_HEAD_TIMEOUT = 10
# The other per-request timeouts and the partial-head budget: (default, what it bounds).
TIMEOUTS = {
    "VRYPT_HEAD_TIMEOUT": DEFAULT_HEAD_TIMEOUT,  # a head's first byte to its end, then 408
    "VRYPT_BODY_TIMEOUT": 60,  # between two reads of a body, then 408 (nginx: 60 s too)
    "VRYPT_SEND_TIMEOUT": 60,  # answers owed, none taken for this long: close (nginx: 60 s)
}
DEFAULT_HEAD_BUFFER = 32 * 1024 * 1024
HOSTILE_SETTINGS = {**TIMEOUTS, "VRYPT_HEAD_BUFFER": DEFAULT_HEAD_BUFFER}


def positive_int_from_env(name: str, default: int) -> int:
    """A positive integer setting from the environment; a bad value raises ValueError."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        unit = "bytes" if name == "VRYPT_HEAD_BUFFER" else "seconds"
        raise ValueError(f"{name}={raw!r}: expected a whole number of {unit}, at least 1")
    return value


def hostile_setting_from_env(name: str) -> int:
    """One of HOSTILE_SETTINGS (a timeout in seconds, or VRYPT_HEAD_BUFFER in bytes)."""
    return positive_int_from_env(name, HOSTILE_SETTINGS[name])


def head_timeout_from_env() -> int:
    """VRYPT_HEAD_TIMEOUT: seconds from a request head's first byte to its end (slowloris)."""
    return positive_int_from_env("VRYPT_HEAD_TIMEOUT", DEFAULT_HEAD_TIMEOUT)


def hostile_settings_from_env() -> dict[str, int]:
    """Every VRYPT_* timeout (seconds) and VRYPT_HEAD_BUFFER (bytes), validated."""
    return {name: hostile_setting_from_env(name) for name in HOSTILE_SETTINGS}


# --- the metrics -------------------------------------------------------------------------------

DEFAULT_STATSD_INTERVAL = 1.0


def statsd_interval_from_env() -> float:
    """VRYPT_STATSD_INTERVAL: seconds between two sends of the metrics (default 1)."""
    raw = os.environ.get("VRYPT_STATSD_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_STATSD_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600:
        raise ValueError(f"VRYPT_STATSD_INTERVAL={raw!r}: expected seconds between 0.05 and 3600")
    return value


# --- HTTP/3 (issue 23) -------------------------------------------------------------------------

HTTP3_CONF = "vrypt_http3"


def http3_wanted(conf: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> bool:
    """$VRYPT_HTTP3, else the conf file's `vrypt_http3` (a bool, or the same words as the
    variable); off when neither is set. The environment wins, as for the answer's settings."""
    raw = environ.get("VRYPT_HTTP3", "")
    if raw.strip():
        return _named("VRYPT_HTTP3", _flag, raw)
    value = conf.get(HTTP3_CONF)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return _flag(value)
        except ValueError as exc:
            raise SettingError(HTTP3_CONF, str(exc)) from None
    raise SettingError(HTTP3_CONF, f"expected True or False, got {type(value).__name__}")


# --- every variable at once --------------------------------------------------------------------


def check_worker_environment(environ: Mapping[str, str] = os.environ) -> None:
    """The VRYPT_* variables the worker itself reads, checked in the arbiter (check_config): a
    bad one raises SettingError naming it, whichever command started the server. The answer's
    variables are checked by answer.from_settings."""
    for name, read, hint in (
        ("VRYPT_HEAD_TIMEOUT", head_timeout_from_env, "expected a whole number of seconds"),
        ("VRYPT_STATSD_INTERVAL", statsd_interval_from_env, ""),
        # The other per-request timeouts and the partial-head budget (issue 14).
        *(
            (name, functools.partial(hostile_setting_from_env, name), "")
            for name in HOSTILE_SETTINGS
            if name != "VRYPT_HEAD_TIMEOUT"
        ),
    ):
        raw = environ.get(name, "")
        if raw.strip():
            _named(name, lambda _text, read=read: read(), raw, hint)
    # Read by conf.py only, but a bad value under `-k vrypt_worker.VryptWorker` is still a
    # mistake the operator wants to hear about rather than a setting silently ignored.
    env_flag("VRYPT_REUSE_PORT", True, environ)
    env_flag("VRYPT_DEFER_ACCEPT", True, environ)  # read by the worker
    env_flag("VRYPT_HTTP3", False, environ)  # checked against the TLS settings by arbiter.py
    env_statsd_host(environ)


def check_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Everything conf.py and vrypt-server read from the environment."""
    env_port(environ)
    env_workers(environ)
    check_worker_environment(environ)


def check_bind_ports(addresses: list[Any], environ: Mapping[str, str] = os.environ) -> None:
    """gunicorn accepts `--bind 0.0.0.0:99999` (and $PORT=99999 as its bind default) and fails
    later, in the socket code of every worker: refuse it here, naming where it came from."""
    for address in addresses:
        if isinstance(address, tuple) and not 0 <= address[1] <= 65535:
            port = environ.get("PORT", "").strip()
            name = "$PORT" if port and port.lstrip("0") == str(address[1]) else "bind"
            raise SettingError(name, f"port out of range 1-65535: {address[1]}")


# --- defaults that fit the machine ---------------------------------------------------------------


def nofile_hard_limit() -> int | None:
    """The hard open-file limit, None when unlimited."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if hard == resource.RLIM_INFINITY else hard


def fitting_worker_connections(wanted: int = DEFAULT_WORKER_CONNECTIONS) -> int:
    """`wanted`, lowered to what the hard open-file limit lets one worker hold, so that the
    default never asks for descriptors the machine will refuse (and never warns about it).
    Under a tiny limit the reserve shrinks to a quarter of it: a worker needs about a dozen
    descriptors of its own, 128 is a margin."""
    hard = nofile_hard_limit()
    if hard is None:
        return wanted
    reserve = min(NOFILE_RESERVE, max(hard // 4, 1))
    return max(1, min(wanted, hard - reserve))


def tcp_migrate_req_enabled() -> bool:
    """Whether the kernel hands a closing SO_REUSEPORT listener's queue to its siblings."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as sysctl:
            return sysctl.read().strip() == "1"
    except OSError:
        return False


# --- one control socket per server ---------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
# sun_path holds 108 bytes with the final NUL; a longer name is shortened to a hash of the binds.
_MAX_SOCKET_PATH = 107


def _bind_label(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return str(port) if host in ("", "0.0.0.0", "::") else f"{host}-{port}"
    if isinstance(address, int):
        return f"fd{address}"
    return "unix-" + os.path.basename(str(address))


def control_socket_path(addresses: list[Any], default_path: str, pid: int | None = None) -> str:
    """A control socket path that names this server's binds, in gunicorn's default directory:
    `vrypt-8080.ctl` for the default bind, `vrypt-127.0.0.1-9000.ctl` for a host, and with `pid`
    `vrypt-8080-PID.ctl`. gunicorn 27's own default (`gunicorn.ctl`) is the same for every server
    of a user, so a second server takes it over and stopping either deletes it."""
    directory = os.path.dirname(default_path)
    label = _UNSAFE.sub("_", "+".join(_bind_label(a) for a in addresses) or "server")
    suffix = "" if pid is None else f"-{pid}"
    path = os.path.join(directory, f"vrypt-{label}{suffix}.ctl")
    if len(path.encode()) > _MAX_SOCKET_PATH:
        digest = hashlib.sha1(label.encode()).hexdigest()[:12]
        path = os.path.join(directory, f"vrypt-{digest}{suffix}.ctl")
    return path
