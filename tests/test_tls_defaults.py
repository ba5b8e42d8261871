"""The TLS defaults an operator can defend (issue 24), checked with `openssl s_client` per
version and per cipher against a real gunicorn process: TLS 1.2 and 1.3 only, forward-secret
key exchange only, no compression, one TLS 1.3 session ticket per full handshake; and gunicorn's
own `ssl_version` and `ciphers` settings winning when the operator sets them.

An RSA certificate (made with the `openssl` command line), so that suites with RSA key exchange
(no forward secrecy) could be negotiated if the server allowed them. s_client itself refuses TLS
1.0 and 1.1 at OpenSSL 3's default security level, so those probes lower its level to 0: the
refusal checked is the server's.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Server, start_server

OPENSSL = "openssl"
REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def rsa_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("rsa")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def _server(rsa_cert: tuple[Path, Path], *extra: str) -> Server:
    cert, key = rsa_cert
    srv = start_server("--certfile", str(cert), "--keyfile", str(key), *extra, ready=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # ready once it completes a handshake and answers
        if srv.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {srv.proc.returncode}:\n{srv.log}")
        if s_client(srv, request=True)[1].count("Vrypt") or _refused_13(srv):
            return srv
        time.sleep(0.1)
    srv.stop()
    raise AssertionError(f"server not ready within 20 s:\n{srv.log}")


def _refused_13(srv: Server) -> bool:
    """Up, but pinned below TLS 1.3: a TLS 1.2 handshake succeeds."""
    return s_client(srv, "-tls1_2")[0]


@pytest.fixture(scope="module")
def server(rsa_cert: tuple[Path, Path]) -> Iterator[Server]:
    srv = _server(rsa_cert)
    try:
        yield srv
    finally:
        srv.stop()


def s_client(server: Server, *args: str, request: bool = False) -> tuple[bool, str]:
    """One `openssl s_client` connection: whether the handshake succeeded, and its output."""
    argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", *args]
    if request:
        argv.append("-ign_eof")  # read the answer (and what follows the handshake) to the close
    done = subprocess.run(argv, input=REQUEST if request else b"", capture_output=True, timeout=30)
    out = (done.stdout + done.stderr).decode(errors="replace")
    ok = done.returncode == 0 and "Cipher is (NONE)" not in out and "New, " in out
    return ok, out


@pytest.mark.parametrize(
    ("flag", "accepted"),
    [("-tls1", False), ("-tls1_1", False), ("-tls1_2", True), ("-tls1_3", True)],
)
def test_versions(server: Server, flag: str, accepted: bool) -> None:
    args = [flag] if accepted else [flag, "-cipher", "DEFAULT@SECLEVEL=0"]
    ok, out = s_client(server, *args)
    assert ok is accepted, out


@pytest.mark.parametrize(
    "cipher",
    [
        "AES128-GCM-SHA256",  # RSA key exchange: no forward secrecy
        "AES256-GCM-SHA384",
        "AES128-SHA256",
        "AES128-SHA",
        "DES-CBC3-SHA",
    ],
)
def test_tls12_without_forward_secrecy_is_refused(server: Server, cipher: str) -> None:
    ok, out = s_client(server, "-tls1_2", "-cipher", f"{cipher}@SECLEVEL=0")
    assert not ok, out


@pytest.mark.parametrize(
    "cipher",
    ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"],
)
def test_tls12_forward_secret_suites_are_served(server: Server, cipher: str) -> None:
    ok, out = s_client(server, "-tls1_2", "-cipher", cipher, request=True)
    assert ok, out
    assert f"Cipher is {cipher}" in out
    assert "Compression: NONE" in out
    assert "Vrypt" in out


@pytest.mark.parametrize(
    "suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
)
def test_tls13_suites_are_served(server: Server, suite: str) -> None:
    ok, out = s_client(server, "-tls1_3", "-ciphersuites", suite, request=True)
    assert ok, out
    assert f"Cipher is {suite}" in out
    assert "Vrypt" in out


def test_one_session_ticket_per_full_handshake(server: Server) -> None:
    """OpenSSL sends two TLS 1.3 tickets by default; one is enough (docs/tls.md) and costs the
    server one ticket's work less per new connection."""
    ok, out = s_client(server, "-tls1_3", "-msg", request=True)
    assert ok, out
    assert out.count("NewSessionTicket") == 1, out


def test_gunicorn_ssl_version_pins_the_version(rsa_cert: tuple[Path, Path]) -> None:
    """gunicorn's (deprecated) `ssl_version` set by the operator wins over our 1.2-1.3."""
    srv = _server(rsa_cert, "--ssl-version", "TLSv1_2")
    try:
        ok, out = s_client(srv, "-tls1_2")
        assert ok, out
        ok, out = s_client(srv, "-tls1_3")
        assert not ok, out
    finally:
        srv.stop()


def test_gunicorn_ciphers_win(rsa_cert: tuple[Path, Path]) -> None:
    """The operator's `ciphers` win, even a suite without forward secrecy."""
    srv = _server(rsa_cert, "--ciphers", "AES128-GCM-SHA256")
    try:
        ok, out = s_client(srv, "-tls1_2", "-cipher", "AES128-GCM-SHA256", request=True)
        assert ok, out
        assert "Cipher is AES128-GCM-SHA256" in out
        ok, out = s_client(srv, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
        assert not ok, out
    finally:
        srv.stop()
