"""vrypt_worker: a gunicorn worker class that answers every HTTP request with `Vrypt`.

Use it as `gunicorn -c conf/gunicorn.conf.py`, `gunicorn -k vrypt_worker.VryptWorker ...`, or the
`vrypt-server` command. The modules, in the order one request meets them:

  worker.py    VryptWorker: gunicorn lifecycle, the gevent hub, one Connection per client socket
  framing.py   RequestFramer: bytes in, one answer per complete request out (no I/O)
  response.py  the precomputed answer bytes, re-rendered once a second for Date
"""

from vrypt_worker.worker import VryptWorker

__all__ = ["VryptWorker"]
__version__ = "0.1.0"
