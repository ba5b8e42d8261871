"""`vrypt-server [PORT | -p PORT | --port PORT]`: the Rust original's command line on gunicorn.

It runs gunicorn with the package's default settings (vrypt_worker/conf.py); GUNICORN_CMD_ARGS
and the VRYPT_* environment variables apply as they do to `gunicorn -c conf/gunicorn.conf.py`.
"""

from __future__ import annotations

import argparse
import sys

from gunicorn.app.wsgiapp import WSGIApplication


def _port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {port}")
    return port


def parse_args(argv: list[str] | None = None) -> int | None:
    """The port asked for, or None for the default (8080, or $PORT when set)."""
    parser = argparse.ArgumentParser(
        prog="vrypt-server",
        description="Answer every HTTP/1.x request with 'Vrypt' on 0.0.0.0:PORT "
        "(gunicorn, one VryptWorker per CPU).",
        epilog="Other gunicorn settings: GUNICORN_CMD_ARGS, or run "
        "`gunicorn -c conf/gunicorn.conf.py` with any gunicorn flag.",
    )
    parser.add_argument("port", nargs="?", type=_port, help="port to listen on (default 8080)")
    parser.add_argument("-p", "--port", dest="port_option", type=_port, metavar="PORT")
    args = parser.parse_args(argv)
    if args.port is not None and args.port_option is not None and args.port != args.port_option:
        parser.error(f"two different ports given: {args.port} and {args.port_option}")
    return args.port_option if args.port_option is not None else args.port


def main(argv: list[str] | None = None) -> None:
    port = parse_args(argv)
    gunicorn_argv = ["vrypt-server", "-c", "python:vrypt_worker.conf"]
    if port is not None:
        gunicorn_argv += ["--bind", f"0.0.0.0:{port}"]
    sys.argv = gunicorn_argv
    WSGIApplication("%(prog)s [PORT | -p PORT | --port PORT]", prog="vrypt-server").run()
