"""`vrypt-server [PORT | -p PORT | --port PORT]`: the Rust original's command line on gunicorn.

It runs gunicorn with the package's default settings (vrypt_worker/conf.py); GUNICORN_CMD_ARGS
and the VRYPT_* environment variables apply as they do to `gunicorn -c conf/gunicorn.conf.py`.
$PORT is the default port, checked like the argument; a port given on the command line wins, and a
bad $PORT is then no obstacle (the server's $PORT becomes the port given, so that gunicorn, which
reads $PORT for its own default bind, and the package's conf agree with what is served). The rest
of the environment is checked before gunicorn is imported, because gunicorn reads
$WEB_CONCURRENCY with int() as it is imported and a bad value would end in its traceback instead
of a message.

The server listens on both address families by default (families.py). What gunicorn runs is
`gunicorn -c python:vrypt_worker.conf [--bind HOST:PORT]`, and a USR2 upgrade re-executes it as
`python -m gunicorn ...` (reexec.py): `vrypt-server`'s own command line is not gunicorn's.
"""

from __future__ import annotations

import argparse
import os
import sys

from vrypt_worker import families, reexec, settings


def _port(text: str) -> int:
    try:
        return settings.parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_port_help() -> str:
    try:
        port = settings.env_port()
    except settings.SettingError as exc:
        # Said as it is: without a PORT argument the server refuses to start with this $PORT.
        text = f"port to listen on (needed: the default, $PORT, is invalid: {exc})"
        return text.replace("%", "%%")  # argparse formats help strings with %
    if port is not None:
        return f"port to listen on (default: $PORT, now {port})"
    return f"port to listen on (default {settings.DEFAULT_PORT}, or $PORT when set)"


def parse_args(argv: list[str] | None = None) -> int | None:
    """The port asked for, or None for the default (8080, or $PORT when set)."""
    parser = argparse.ArgumentParser(
        prog="vrypt-server",
        description="Answer every HTTP request with 'Vrypt' on PORT of every address, IPv6 "
        "and IPv4 ([::] with IPV6_V6ONLY off, else 0.0.0.0) (gunicorn, one VryptWorker per CPU).",
        epilog="Other gunicorn settings: GUNICORN_CMD_ARGS, or run "
        "`gunicorn -c conf/gunicorn.conf.py` with any gunicorn flag. The answer: VRYPT_STATUS, "
        "VRYPT_BODY, VRYPT_BODY_FILE, VRYPT_CONTENT_TYPE, VRYPT_HEADERS (see the README).",
    )
    parser.add_argument("port", nargs="?", type=_port, help=_default_port_help())
    parser.add_argument("-p", "--port", dest="port_option", type=_port, metavar="PORT")
    args = parser.parse_args(argv)
    if args.port is not None and args.port_option is not None and args.port != args.port_option:
        parser.error(f"two different ports given: {args.port} and {args.port_option}")
    port = args.port_option if args.port_option is not None else args.port
    try:
        # The other variables are refused even when an argument names the port, as conf.py
        # refuses them: a bad value in the environment is a mistake wherever it is used. $PORT
        # only names a default, which a port given here replaces.
        if port is None:
            settings.check_environment()
        else:
            settings.env_workers()
            settings.check_worker_environment()
    except settings.SettingError as exc:
        parser.error(str(exc))
    return port


def main(argv: list[str] | None = None) -> None:
    port = parse_args(argv)
    if port is not None:
        os.environ["PORT"] = str(port)  # the port given wins over $PORT (module docstring)
    from gunicorn.app.wsgiapp import WSGIApplication  # after the environment is known good

    # argv[0]: what a USR2 upgrade re-executes (after the interpreter); gunicorn's __main__.py,
    # which the arbiter turns into `-m gunicorn` (reexec.start_as_started).
    gunicorn_argv = [reexec.gunicorn_main(), "-c", "python:vrypt_worker.conf"]
    if port is not None:
        gunicorn_argv += ["--bind", families.default_bind(port)]
    sys.argv = gunicorn_argv
    WSGIApplication("%(prog)s [PORT | -p PORT | --port PORT]", prog="vrypt-server").run()
