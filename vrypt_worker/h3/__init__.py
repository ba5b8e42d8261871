"""HTTP/3 over QUIC (issue 23): I/O-free cores on aioquic's sans-I/O QuicConnection and
H3Connection. `answers.py` the answer's HTTP/3 fields (Date once a second), `session.py` one QUIC
connection answering every request stream, `endpoint.py` the connections of one worker keyed by
connection ID (datagrams in, datagrams out, timers). The socket loop is `vrypt_worker/quic.py`.

aioquic is an optional dependency (the `http3` extra): nothing imports this package unless
VRYPT_HTTP3 is on.
"""
