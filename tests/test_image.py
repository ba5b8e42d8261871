"""The image of deploy/Dockerfile, built and run as the manifests in deploy/k8s run it (issue 26).

Heavy: podman builds the image on a base made from Debian's packages (tests/containers.py) and
runs it with runc on the host's network. Skipped, saying why, where podman, runc or mmdebstrap
are missing or cannot run a container.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
import yaml

from tests import containers
from tests.containers import Container, container, podman
from tests.support import ROOT, StrictReader, is_vrypt
from vrypt_worker import conf

K8S = ROOT / "deploy" / "k8s"
UID = GID = 10001  # deploy/Dockerfile's USER, the Deployment's runAsUser


def heavy(test):  # type: ignore[no-untyped-def]
    """A test that builds or runs the image: minutes from cold (the base image, the build)."""
    return pytest.mark.heavy(pytest.mark.timeout(900)(test))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    why = containers.missing_tools()
    if why:
        pytest.skip(why)
    tag, why = containers.ensure_base(tmp_path_factory.mktemp("base") / "mmdebstrap.log")
    if tag is None:
        pytest.skip(why)
    why = containers.runtime_problem(tag)
    if why:
        pytest.skip(why)
    return tag


@pytest.fixture(scope="module")
def image(base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tag = f"localhost/vrypt-worker:test-{os.getpid()}"
    containers.build_image(base, tag, tmp_path_factory.mktemp("build") / "build.log")
    yield tag
    podman("rmi", "--force", tag, check=False)


@pytest.fixture
def statsd() -> Iterator[socket.socket]:
    """A UDP socket on the host's loopback, where the container sends its StatsD lines."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def gauge(sock: socket.socket, name: str, expected: int, timeout: float = 10) -> None:
    """Values of the StatsD gauge `name` arrive on `sock` until one is `expected` (while the
    workers boot the arbiter may report fewer first, never more)."""
    deadline = time.monotonic() + timeout
    values: list[int] = []
    while time.monotonic() < deadline and expected not in values:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            packet = sock.recv(65535).decode()
        except TimeoutError:
            break
        for line in packet.splitlines():
            match = re.fullmatch(rf"{re.escape(name)}:(\d+)\|g", line)
            if match:
                values.append(int(match.group(1)))
    assert expected in values and max(values) == expected, (name, values)


def connect(box: Container) -> socket.socket:
    return socket.create_connection(("127.0.0.1", box.port), timeout=10)


def answers_vrypt(box: Container) -> None:
    with connect(box) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        response = StrictReader(sock).read()
    assert response is not None and is_vrypt(response), (response, box.logs())


def workers(box: Container, expected: int, timeout: float = 20) -> list[int]:
    """The host PIDs of the arbiter's workers, once there are `expected` of them (or the timeout).
    A worker is a child the log says was booted as a worker: the arbiter's other child, with a
    StatsD host, is the metrics pusher."""
    deadline = time.monotonic() + timeout
    while True:
        booted = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", box.logs())}
        children = containers.host_processes(box.pid)
        found = [pid for pid in children if containers.pid_inside(pid) in booted]
        if len(found) == expected or time.monotonic() > deadline:
            assert len(found) == expected, (children, box.logs())
            assert len(children) - len(found) <= 1, (children, box.logs())
            return found
        time.sleep(0.1)


def runs_as_the_image_user(box: Container, pids: list[int]) -> None:
    for pid in (box.pid, *pids):
        assert containers.ids(pid) == (UID, GID), pid


def changed_paths(changes: str) -> set[str]:
    """The paths of `podman diff --format json`: {"added": [...], "changed": [...], ...}."""
    return {path for kind in yaml.safe_load(changes).values() for path in kind}


# --- the image ----------------------------------------------------------------------------------


def test_docs_say_how_to_build_without_a_registry() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for text in ("mmdebstrap --variant=minbase", "podman import", "PYTHON_IMAGE=", "podman build"):
        assert text in doc, text
    assert re.search(r"\d+ MB", doc) and "podman image inspect" in doc


@heavy
def test_image_adds_the_venv_and_nothing_of_the_build(image: str, base: str) -> None:
    """Point 2 of issue 26: all the image adds to its base is the venv, the user and conf/; no
    source tree, no wheels, no pip, none of the dependencies' test suites."""
    paths = changed_paths(podman("diff", "--format", "json", image, base).stdout)
    allowed = re.compile(
        r"/(opt|home|etc)|/etc/(\.pwd\.lock|(passwd|group|shadow|gshadow)-?)"
        r"|/opt/vrypt(/.*)?|/home/vrypt(/.*)?|/app(/conf(/.*)?)?"
    )
    assert sorted(p for p in paths if not allowed.fullmatch(p)) == []
    venv = [p for p in paths if p.startswith("/opt/vrypt/")]
    assert any(p.endswith("/site-packages/vrypt_worker/worker.py") for p in venv)
    assert any(p.endswith("/site-packages/gevent/__init__.py") for p in venv)
    assert not [p for p in venv if re.search(r"/site-packages/(pip|setuptools)/|/tests/", p)]
    added = containers.image_size(image) - containers.image_size(base)
    # 14 MB (docs/deploy.md): gevent, greenlet, gunicorn, zope.interface, h2 and this package
    assert 0 < added < 20_000_000, added
    inspected = podman("image", "inspect", "--format", "{{json .Config}}", image)
    config = yaml.safe_load(inspected.stdout)
    assert config["User"] == f"{UID}:{GID}"
    assert config["Cmd"] == ["gunicorn", "-c", "conf/gunicorn.conf.py"]


def cpusets() -> list[str]:
    """One CPU, and two where this process may use two or more."""
    cpus = sorted(os.sched_getaffinity(0))
    return [str(cpus[0])] + ([f"{cpus[0]},{cpus[1]}"] if len(cpus) > 1 else [])


@heavy
@pytest.mark.parametrize("cpuset", cpusets())
def test_the_image_answers_on_port_with_a_worker_per_cpu(
    image: str, statsd: socket.socket, cpuset: str
) -> None:
    """`podman run IMAGE`, the image's own command: 200 Vrypt on $PORT, as uid 10001, one worker
    per CPU the container may use, counted in the container and by the gunicorn.workers gauge."""
    cpus = len(cpuset.split(","))
    collector = f"127.0.0.1:{statsd.getsockname()[1]}"
    options = ["--cpuset-cpus", cpuset, "--env", f"VRYPT_STATSD_HOST={collector}"]
    with container(image, options) as box:
        answers_vrypt(box)
        runs_as_the_image_user(box, workers(box, cpus))
        gauge(statsd, "gunicorn.workers", cpus)


# --- as deploy/k8s/deployment.yaml runs it ------------------------------------------------------


def deployment() -> tuple[dict, dict]:
    """The pod spec of the Deployment and its gunicorn container."""
    [spec] = [
        doc["spec"]["template"]["spec"]
        for doc in yaml.safe_load_all((K8S / "deployment.yaml").read_text())
        if doc and doc["kind"] == "Deployment"
    ]
    [main] = [c for c in spec["containers"] if c["name"] == "vrypt"]
    return spec, main


def cpu_quantity(value: str) -> float:
    """A Kubernetes CPU quantity ("2", "500m") in CPUs."""
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def memory_quantity(value: str) -> str:
    """A Kubernetes memory quantity in Mi or Gi, as podman writes it."""
    match = re.fullmatch(r"(\d+)(Mi|Gi)", value)
    assert match, value
    return f"{match.group(1)}{match.group(2)[0].lower()}"


def as_the_deployment(statsd_port: int) -> tuple[list[str], list[str], list[str]]:
    """(podman options, command, writable mount points) for the Deployment's gunicorn container:
    its command, environment, working directory, security context, emptyDir volumes and limits.
    A field this cannot give podman fails the test rather than being left out."""
    spec, main = deployment()
    limits = main["resources"]["limits"]
    cpus = cpu_quantity(limits["cpu"])
    options = ["--workdir", main["workingDir"], "--cpus", str(cpus)]
    options += ["--memory", memory_quantity(limits["memory"])]
    for var in main["env"]:
        name = var["name"]
        if name == "PORT":
            continue  # container() gives each container a port of its own
        if "value" in var:
            value = var["value"]
        else:  # the downward API: the CPU limit, rounded up to whole units of the divisor
            ref = var["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu", ref
            value = str(math.ceil(cpus / cpu_quantity(str(ref.get("divisor", "1")))))
        if name == "VRYPT_STATSD_HOST":
            host, _, _ = value.rpartition(":")
            assert host == "127.0.0.1", "the sidecar listens on the pod's loopback"
            value = f"{host}:{statsd_port}"
        options += ["--env", f"{name}={value}"]
    pod_security = spec["securityContext"]
    options += ["--user", f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    # Not even podman's own tmpfs on /tmp, /run and /var/tmp: only the manifest's volumes.
    options += ["--read-only", "--read-only-tmpfs=false"]
    assert security["capabilities"]["drop"] == ["ALL"]
    options += ["--cap-drop=all"]
    if security.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt=no-new-privileges"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = []
    for mount in main["volumeMounts"]:
        empty_dir = volumes[mount["name"]]["emptyDir"]
        assert empty_dir.get("medium") == "Memory", "a memory-backed emptyDir is a tmpfs"
        size = memory_quantity(empty_dir["sizeLimit"])
        path = mount["mountPath"]
        options += ["--mount", f"type=tmpfs,destination={path},tmpfs-size={size},tmpfs-mode=1777"]
        mounts.append(path)
    return options, [*main["command"], *main.get("args", [])], mounts


@contextlib.contextmanager
def pod(image: str, statsd: socket.socket) -> Iterator[tuple[Container, list[str]]]:
    options, command, mounts = as_the_deployment(statsd.getsockname()[1])
    with container(image, options, command) as box:
        yield box, mounts


@heavy
def test_as_the_deployment_runs_it_on_a_read_only_root(image: str, statsd: socket.socket) -> None:
    """uid 10001, a read-only root filesystem and only the Deployment's emptyDir writable (its
    TMPDIR points there too): it answers, its workers are the CPU limit, the StatsD gauge leaves
    for VRYPT_STATSD_HOST, and nothing is written anywhere else."""
    _, main = deployment()
    expected = math.ceil(cpu_quantity(main["resources"]["limits"]["cpu"]))
    with pod(image, statsd) as (box, mounts):
        answers_vrypt(box)
        runs_as_the_image_user(box, workers(box, expected))
        gauge(statsd, "gunicorn.workers", expected)
        assert box.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
        write = podman("exec", box.name, "python3", "-c", "open('/app/x', 'w')", check=False)
        assert "Read-only file system" in write.stderr, write
        answers_vrypt(box)
        log = box.logs()
        assert "[ERROR]" not in log and "Read-only" not in log and "Traceback" not in log, log
        # The container's own layer: the mount points, and /etc where podman mounts hosts,
        # hostname and resolv.conf. Nothing that gunicorn or its workers wrote.
        paths = changed_paths(podman("diff", "--format", "json", box.name).stdout)
        parents = {str(parent) for m in mounts for parent in Path(m).parents if str(parent) != "/"}
        assert paths <= {"/etc", *mounts, *parents}, paths


@heavy
def test_podman_stop_drains_and_exits_0(image: str, statsd: socket.socket) -> None:
    """SIGTERM from `podman stop`: an idle keep-alive connection is closed at once, a request
    whose body is still arriving is answered, and the container exits 0 within graceful_timeout
    (podman's own timeout, past which it would SIGKILL, is set longer)."""
    with pod(image, statsd) as (box, _):
        idle = connect(box)
        idle.sendall(b"GET /idle HTTP/1.1\r\nHost: test\r\n\r\n")
        idle_reader = StrictReader(idle)
        first = idle_reader.read()
        assert first is not None and is_vrypt(first)
        busy = connect(box)
        busy.sendall(b"POST /busy HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nhalf-")
        time.sleep(0.5)  # in the worker, mid-body
        started = time.monotonic()
        patience = str(conf.graceful_timeout + 20)
        stop = subprocess.Popen(
            [containers.PODMAN or "podman", "stop", "--time", patience, box.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            # The worker got SIGTERM: it closes its idle connections without waiting for keepalive.
            assert idle_reader.at_eof(timeout=10), box.logs()
            busy.sendall(b"body!")
            reader = StrictReader(busy)
            answer = reader.read()
            assert answer is not None and is_vrypt(answer), box.logs()
            assert answer.header(b"Connection") == b"close" and reader.at_eof()
            assert stop.wait(conf.graceful_timeout + 30) == 0, stop.stderr
        finally:
            if stop.poll() is None:
                stop.kill()
            idle.close()
            busy.close()
        elapsed = time.monotonic() - started
        assert elapsed < conf.graceful_timeout, elapsed
        assert box.inspect("{{.State.ExitCode}}") == "0", box.logs()


# --- TLS and HTTP/2 through GUNICORN_CMD_ARGS ----------------------------------------------------


@heavy
def test_tls_and_http2_through_gunicorn_cmd_args(
    image: str, statsd: socket.socket, tmp_path: Path
) -> None:
    """As the README has it: GUNICORN_CMD_ARGS="--certfile ... --keyfile ... --http-protocols
    h2,h1", the certificates mounted read-only. ALPN picks h2; HTTP/1.1 over TLS works too."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    certs = tmp_path / "certs"
    certs.mkdir(mode=0o755)
    certs.chmod(0o755)  # the container's user reads them
    leaf.cert_chain_pems[0].write_to_path(str(certs / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(certs / "key.pem"))
    for pem in certs.iterdir():
        pem.chmod(0o644)
    args = "--certfile /certs/cert.pem --keyfile /certs/key.pem --http-protocols h2,h1"
    options = [
        "--volume",
        f"{certs}:/certs:ro",
        "--env",
        f"GUNICORN_CMD_ARGS={args}",
        # Not the default 127.0.0.1:8125, which is the host's here (--network=host).
        "--env",
        f"VRYPT_STATSD_HOST=127.0.0.1:{statsd.getsockname()[1]}",
    ]
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with container(image, options) as box:
        url = f"https://127.0.0.1:{box.port}/tls"
        for http2, version in ((True, "HTTP/2"), (False, "HTTP/1.1")):
            with httpx.Client(http2=http2, verify=context, timeout=10) as client:
                answer = client.get(url)
            assert (answer.http_version, answer.status_code) == (version, 200), box.logs()
            assert answer.text == "Vrypt"
        assert "[ERROR]" not in box.logs()
