"""The minimal WSGI app the gunicorn references serve when ``vrypt_worker.wsgi`` is absent."""

from collections.abc import Callable, Iterable

BODY = b"Vrypt"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
    start_response("200 OK", HEADERS)
    return [BODY]
