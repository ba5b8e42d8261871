"""The WSGI application gunicorn's own sync worker serves in tests/test_limits_differential.py.

It reads the whole request body before it answers, so that gunicorn reads, and holds to its
limits, a chunked body's trailer section before the answer is decided, as VryptWorker does.
"""

from collections.abc import Callable, Iterable


def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"Vrypt"]
