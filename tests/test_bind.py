"""The default bind serves both address families (issue 22): `[::]` with IPV6_V6ONLY off, so that
`[::1]` and 127.0.0.1 both answer, said at start; IPv6 switched off by sysctl still serves IPv4;
an IPv4 peer of the dual-stack listener keeps its h2c trust. Real gunicorn processes; the port is
passed as $PORT, as platforms do, since `--bind` would replace the default under test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
from ipaddress import ip_network

import pytest

from tests.support import (
    CONF,
    ROOT,
    Server,
    base_env,
    free_port,
    is_vrypt,
    read_responses,
    start_server,
)
from vrypt_worker import families
from vrypt_worker.h2 import H2cPolicy

DUAL = families.dual_stack_available()
GET = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def answers(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(GET)
        got = read_responses(sock, 1)
    return len(got) == 1 and is_vrypt(got[0])


def default_bind_server(*args: str, cmd: list[str] | None = None, **env: str) -> Server:
    port = free_port()
    cmd = cmd or [sys.executable, "-m", "gunicorn", "-c", str(CONF), "--workers", "1"]
    cmd = [*cmd, *args]
    environ = base_env(PORT=str(port), GUNICORN_CMD_ARGS="--no-control-socket", **env)
    return start_server(cmd=cmd, port=port, env=environ)


@pytest.mark.skipif(not DUAL, reason="this machine has no IPv6 sockets: the default is 0.0.0.0")
@pytest.mark.parametrize("form", ["conf", "vrypt-server"])
def test_default_bind_answers_ipv6_and_ipv4(form: str) -> None:
    cmd = [sys.executable, "-m", "vrypt_worker"] if form == "vrypt-server" else None
    server = default_bind_server(cmd=cmd, WEB_CONCURRENCY="2")
    try:
        assert answers("127.0.0.1", server.port)
        assert answers("::1", server.port)  # the original bound 0.0.0.0 only: refused
        assert f"Listening at: http://[::]:{server.port} (" in server.log
        assert f"[::]:{server.port} serves IPv6 and IPv4 (IPV6_V6ONLY off" in server.log
    finally:
        server.stop()


def test_default_bind_names_what_it_chose() -> None:
    assert families.default_bind(8080) == ("[::]:8080" if DUAL else "0.0.0.0:8080")


@pytest.mark.skipif(not DUAL, reason="this machine has no IPv6 sockets")
def test_ipv4_peer_of_the_dual_stack_bind_keeps_its_h2c_trust() -> None:
    # 127.0.0.1 through `[::]` is ::ffff:127.0.0.1; forwarded_allow_ips says 127.0.0.1.
    server = default_bind_server("--http-protocols", "h2,h1", "--http2-cleartext", "both")
    try:
        url = f"http://127.0.0.1:{server.port}/"
        argv = ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-o", "/dev/null"]
        curl = subprocess.run(
            [*argv, "-w", "%{http_version} %{http_code}", url],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert curl.stdout == "2 200", (curl.stdout, curl.stderr)
    finally:
        server.stop()


def test_h2c_trust_unmaps_ipv4_mapped_peers() -> None:
    policy = H2cPolicy(mode="both", available=True, networks=(ip_network("127.0.0.1/32"),))
    assert policy.trusted(("::ffff:127.0.0.1", 1, 0, 0))
    assert policy.trusted(("127.0.0.1", 1))
    assert not policy.trusted(("::ffff:10.0.0.1", 1, 0, 0))
    assert not policy.trusted(("::1", 1, 0, 0))


UNSHARE = shutil.which("unshare")

# Run inside a private network namespace whose IPv6 is switched off by sysctl (what many
# container runtimes do): the default bind must still start and serve IPv4.
IN_NETNS = textwrap.dedent(
    """
    import sys
    from tests.support import CONF, base_env, free_port, read_responses, start_server, is_vrypt
    import socket
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(CONF), "--workers", "1"]
    env = base_env(PORT=str(port), GUNICORN_CMD_ARGS="--no-control-socket")
    server = start_server(cmd=cmd, port=port, env=env)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n")
            assert is_vrypt(read_responses(sock, 1)[0])
        print(server.log)
    finally:
        server.stop()
    """
)


def netns_ok() -> bool:
    if UNSHARE is None:
        return False
    probe = subprocess.run([UNSHARE, "--net", "true"], capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not netns_ok(), reason="needs unshare --net (root or user namespaces)")
def test_default_bind_with_ipv6_disabled_by_sysctl_serves_ipv4() -> None:
    script = (
        "ip link set lo up && for c in all default lo; do "
        "sysctl -qw net.ipv6.conf.$c.disable_ipv6=1; done && "
        f'exec {sys.executable} -c "$VRYPT_NETNS_SCRIPT"'
    )
    result = subprocess.run(
        [UNSHARE, "--net", "sh", "-c", script],
        cwd=ROOT,
        env=base_env(VRYPT_NETNS_SCRIPT=IN_NETNS),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "serves IPv" in result.stdout, result.stdout  # said at start, whichever it is


@pytest.mark.skipif(not DUAL, reason="this machine has no IPv6 sockets")
def test_ipv4_proxy_of_the_dual_stack_bind_may_send_a_proxy_header() -> None:
    # 127.0.0.1 through `[::]` is ::ffff:127.0.0.1; proxy_allow_ips says 127.0.0.1 (the default).
    from vrypt_worker.proxy_header import v1_header

    server = default_bind_server("--proxy-protocol", "v1")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(v1_header(("203.0.113.7", 4242), ("198.51.100.1", 80)) + GET)
            got = read_responses(sock, 1)
        assert len(got) == 1 and is_vrypt(got[0]), got  # 403 when judged as IPv6
    finally:
        server.stop()
