"""The same answer as a three-line WSGI application.

VryptWorker never calls it. It exists so that `conf/gunicorn.conf.py` names an application that
gunicorn can import when asked to (`preload_app`, or another worker class such as `-k gevent`,
which is how the benchmarks measure gunicorn's own workers against this one).
"""


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"Vrypt"]
