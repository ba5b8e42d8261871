"""`vrypt-server [PORT | -p PORT | --port PORT]`: the Rust original's command line on gunicorn.

It runs gunicorn with the package's default settings (vrypt_worker/conf.py); GUNICORN_CMD_ARGS
and the VRYPT_* environment variables apply as they do to `gunicorn -c conf/gunicorn.conf.py`.
$PORT is the default port, checked like the argument; the environment is checked before gunicorn
is imported, because gunicorn reads $WEB_CONCURRENCY with int() as it is imported and a bad value
would end in its traceback instead of a message.
"""

from __future__ import annotations

import argparse
import os
import sys

from vrypt_worker import settings


def _port(text: str) -> int:
    try:
        return settings.parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_port_help() -> str:
    raw = os.environ.get("PORT", "").strip()
    if raw:
        return f"port to listen on (default: $PORT, now {raw})"
    return f"port to listen on (default {settings.DEFAULT_PORT}, or $PORT when set)"


def parse_args(argv: list[str] | None = None) -> int | None:
    """The port asked for, or None for the default (8080, or $PORT when set)."""
    parser = argparse.ArgumentParser(
        prog="vrypt-server",
        description="Answer every HTTP request with 'Vrypt' on 0.0.0.0:PORT "
        "(gunicorn, one VryptWorker per CPU).",
        epilog="Other gunicorn settings: GUNICORN_CMD_ARGS, or run "
        "`gunicorn -c conf/gunicorn.conf.py` with any gunicorn flag. The answer: VRYPT_STATUS, "
        "VRYPT_BODY, VRYPT_BODY_FILE, VRYPT_CONTENT_TYPE, VRYPT_HEADERS (see the README).",
    )
    parser.add_argument("port", nargs="?", type=_port, help=_default_port_help())
    parser.add_argument("-p", "--port", dest="port_option", type=_port, metavar="PORT")
    args = parser.parse_args(argv)
    if args.port is not None and args.port_option is not None and args.port != args.port_option:
        parser.error(f"two different ports given: {args.port} and {args.port_option}")
    try:
        # $PORT and the other variables are refused even when an argument names the port, as
        # conf.py refuses them: a bad value in the environment is a mistake wherever it is used.
        settings.check_environment()
    except settings.SettingError as exc:
        parser.error(str(exc))
    return args.port_option if args.port_option is not None else args.port


def main(argv: list[str] | None = None) -> None:
    port = parse_args(argv)
    from gunicorn.app.wsgiapp import WSGIApplication  # after the environment is known good

    gunicorn_argv = ["vrypt-server", "-c", "python:vrypt_worker.conf"]
    if port is not None:
        gunicorn_argv += ["--bind", f"0.0.0.0:{port}"]
    sys.argv = gunicorn_argv
    WSGIApplication("%(prog)s [PORT | -p PORT | --port PORT]", prog="vrypt-server").run()
