"""A USR2 upgrade that works however the server was started.

gunicorn re-executes an upgrading arbiter as `sys.executable` followed by `sys.argv`. Started as
`python -m gunicorn ...`, `sys.argv[0]` is the path of gunicorn's `__main__.py`, so the new
arbiter runs that file as a script: Python puts the script's folder, gunicorn's own package
directory, first on `sys.path`, and gunicorn's `http` subpackage then shadows the standard
library's `http` for every module the new process imports (`from http import HTTPStatus` fails).

Two measures, both needed:
- `start_as_started(server)` (arbiter, when our hooks first see it): the command gunicorn will
  re-execute names the module again (`python -m gunicorn ...`), so the new arbiter starts exactly
  as the first did. This fixes the cause, for every module the new process loads (the worker, its
  dependencies, the operator's own conf), not only ours.
- `unshadow_stdlib()` (the first thing the package does when imported): when the process was
  started with gunicorn's script path all the same (an upgrade from an arbiter that lacked the
  measure above, i.e. the first upgrade onto this version, or someone running `__main__.py`
  directly), gunicorn's folder leaves `sys.path` before anything of ours imports the standard
  library's `http`. gunicorn itself imports only `gunicorn.http`, never a top-level `http`, before
  it loads a conf file or a worker class (checked on 27.0.1).

Avoiding the standard library's `http` in our own modules would not be enough: any dependency,
now or later, may import it (gevent, h2's tooling, an HTTP/3 stack), and an operator's conf may.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _gunicorn_dir() -> str | None:
    module = sys.modules.get("gunicorn")
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.realpath(path)) if path else None


def _is_gunicorn_dir(entry: str, gunicorn_dir: str) -> bool:
    return os.path.realpath(entry or os.curdir) == gunicorn_dir


def unshadow_stdlib() -> None:
    """Take gunicorn's package directory off `sys.path` (it is there only when gunicorn's
    `__main__.py` ran as a script), and forget a top-level `http` loaded from it."""
    gunicorn_dir = _gunicorn_dir()
    if gunicorn_dir is None:
        return
    sys.path[:] = [entry for entry in sys.path if not _is_gunicorn_dir(entry, gunicorn_dir)]
    shadow = sys.modules.get("http")
    where = getattr(shadow, "__file__", None) or ""
    if where and os.path.realpath(where).startswith(gunicorn_dir + os.sep):
        for name in [name for name in sys.modules if name == "http" or name.startswith("http.")]:
            del sys.modules[name]


def gunicorn_main() -> str:
    """The path of gunicorn's `__main__.py` (imports gunicorn): `vrypt-server` puts it first in
    the command line it hands gunicorn, so that a USR2 upgrade re-executes `python -m gunicorn`
    with gunicorn's arguments (its own command line takes a port, not gunicorn's flags)."""
    import gunicorn

    return os.path.join(os.path.dirname(os.path.realpath(gunicorn.__file__)), "__main__.py")


def start_as_started(server: Any) -> None:
    """The command gunicorn's Arbiter re-executes on USR2 (`START_CTX["args"]`: the interpreter,
    then sys.argv): when it runs gunicorn's `__main__.py` by path, run the module instead."""
    args = getattr(server, "START_CTX", {}).get("args")
    gunicorn_dir = _gunicorn_dir()
    if not args or len(args) < 2 or gunicorn_dir is None:
        return
    script = args[1]
    if os.path.basename(script) == "__main__.py" and _is_gunicorn_dir(
        os.path.dirname(script), gunicorn_dir
    ):
        args[1:2] = ["-m", "gunicorn"]


def plain_control_socket_at_promotion(server: Any, plain: str, in_use: Any) -> None:
    """The new arbiter of a USR2 upgrade starts while the old one still holds the control socket
    `plain`, so it takes a pid-suffixed name (arbiter.on_starting); the old one deletes `plain`
    when it exits. Once gunicorn promotes the new arbiter (its parent, the old one, is gone), the
    control socket moves back to `plain`, where operators and scripts look for it, unless
    another live server answers there (`in_use(path)`). gunicorn has no hook at promotion: its
    `maybe_promote_master` is wrapped on this arbiter object, as arbiter.py does for others."""
    promote = server.maybe_promote_master

    def maybe_promote_master() -> None:
        upgrading = server.master_pid != 0
        promote()
        if not upgrading or server.master_pid != 0 or server.cfg.control_socket == plain:
            return
        if in_use(plain):
            return
        # gunicorn 27's own pair (Arbiter.run starts the server, halt stops it), checked
        # against 27.0.1; without them the socket keeps its suffixed name.
        stop = getattr(server, "_stop_control_server", None)
        start = getattr(server, "_start_control_server", None)
        if stop is None or start is None:
            return
        stop()
        server.cfg.set("control_socket", plain)
        start()  # gunicorn logs "Control socket listening at <plain>"

    server.maybe_promote_master = maybe_promote_master
