"""vrypt_worker: a gunicorn worker class that answers every HTTP request with `Vrypt`.

Use it as `gunicorn -c conf/gunicorn.conf.py`, `gunicorn -k vrypt_worker.VryptWorker ...`, or the
`vrypt-server` command. The modules, in the order one plain HTTP/1 request meets them:

  worker.py    VryptWorker: gunicorn lifecycle, the gevent hub, accepting, the sweep
  plain.py     Connection: one client socket, read, framed and answered in the loop
  framing.py   RequestFramer: bytes in, one answer per complete request out (no I/O)
  response.py  the precomputed answer bytes, re-rendered once a second for Date

docs/architecture.md has every layer and the path on each transport (TLS, HTTP/2).
"""

from vrypt_worker import reexec

# Before anything of ours imports the standard library: a USR2 upgrade of a server started with
# `python -m gunicorn` may run gunicorn's __main__.py as a script (reexec.py says why).
reexec.unshadow_stdlib()

from vrypt_worker.worker import VryptWorker  # noqa: E402

__all__ = ["VryptWorker"]
__version__ = "0.1.0"
