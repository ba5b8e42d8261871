"""deploy/Dockerfile built and run with podman, for tests/test_image.py (issue 26).

No registry needs to be reachable: the base image is made from Debian's packages with mmdebstrap
and imported into podman's store, where it stays between runs (its tag names a hash of the
recipe). Containers run with runc, on the host's network (each on a port of its own, through
$PORT), with the limits podman's defaults would exceed on some machines. docs/deploy.md says the
same for people.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT, free_port

PODMAN = shutil.which("podman")
MMDEBSTRAP = shutil.which("mmdebstrap")
RUNC = shutil.which("runc")

# The system's CA bundle goes into the base, so that pip in the build stage trusts what this
# machine trusts (a network that intercepts TLS has its own CA in there).
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# mmdebstrap's hook that merges /usr without the usrmerge package (which pulls in 50 MB of perl).
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")


def base_recipe() -> list[str]:
    """The mmdebstrap command for a Debian 12 image with python3 and its venv module, trimmed as
    debian:bookworm-slim (under python:3.x-slim) is: no manuals, docs or translations."""
    recipe = [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        "--include=python3,python3-venv,python3-pip,ca-certificates",
        *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    ]
    if MERGED_USR_HOOKS.is_dir():
        recipe.append(f"--hook-dir={MERGED_USR_HOOKS}")
    if CA_BUNDLE.is_file():
        recipe.append(f"--customize-hook=copy-in {CA_BUNDLE} {CA_BUNDLE.parent}")
    return [*recipe, "bookworm", "-"]


# `podman import` takes a bare filesystem: give it what a base image's config usually says.
IMPORT_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    'CMD ["python3"]',
)

# runc, not crun: crun refused hosts with hybrid cgroups (issue 26). The limits: podman's nofile
# default (1048576) is over the hard limit of some hosts, which runc then cannot set. Host
# network: no CNI plugin or port mapping needed, and 127.0.0.1 inside is the host's, as in a pod.
RUN = (
    "--runtime",
    "runc",
    "run",
    "--network=host",
    "--ulimit",
    "nofile=1024:20000",
    "--ulimit",
    "nproc=4096:4096",
)


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    assert PODMAN is not None
    result = subprocess.run(
        [PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def missing_tools() -> str | None:
    """Why these tests cannot run here, or None."""
    absent = [n for n, path in (("podman", PODMAN), ("runc", RUNC)) if path is None]
    if absent:
        return f"{' and '.join(absent)} not installed (apt-get install podman mmdebstrap runc)"
    return None


def base_tag() -> str:
    """A tag that changes with the recipe and with the CA bundle copied in."""
    digest = hashlib.sha256(json.dumps([base_recipe(), IMPORT_CHANGES]).encode())
    if CA_BUNDLE.is_file():
        digest.update(CA_BUNDLE.read_bytes())
    return f"localhost/vrypt-test-base:bookworm-{digest.hexdigest()[:12]}"


def ensure_base(log: Path) -> tuple[str | None, str]:
    """(tag, "") once the base image is in podman's store, else (None, why not). Made only when
    missing: about 30-50 s for mmdebstrap, seconds for the import."""
    tag = base_tag()
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag, ""
    if MMDEBSTRAP is None:
        return None, "mmdebstrap not installed (apt-get install mmdebstrap)"
    changes = [arg for change in IMPORT_CHANGES for arg in ("--change", change)]
    with log.open("wb") as sink:
        debootstrap = subprocess.Popen(
            [MMDEBSTRAP, *base_recipe()[1:]], stdout=subprocess.PIPE, stderr=sink
        )
        assert PODMAN is not None and debootstrap.stdout is not None
        imported = subprocess.run(
            [PODMAN, "import", "--quiet", *changes, "-", tag],
            stdin=debootstrap.stdout,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            timeout=600,
            check=False,
        )
        debootstrap.stdout.close()
        debootstrap.wait(60)
    if debootstrap.returncode != 0 or imported.returncode != 0:
        podman("rmi", "--force", tag, check=False)
        tail = log.read_text(errors="replace")[-2000:]
        return None, f"cannot make a Debian base image with mmdebstrap here:\n{tail}"
    # Bases of earlier recipes (or CA bundles) are of no more use.
    repository = tag.rpartition(":")[0]
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", repository, check=False)
    for old in set(listed.stdout.split()) - {tag}:
        podman("rmi", old, check=False)
    return tag, ""


def runtime_problem(base: str) -> str | None:
    """Why podman cannot run a container on this machine, or None."""
    probe = podman(*RUN, "--rm", base, "true", check=False, timeout=120)
    if probe.returncode != 0:
        return f"podman cannot run a container here: {probe.stderr.strip()[-1000:]}"
    return None


def build_image(base: str, tag: str, log: Path) -> None:
    """`podman build` of deploy/Dockerfile from the project root, on the Debian base.
    --layers=false: no cached intermediate images to pile up over runs (the build takes
    seconds)."""
    assert PODMAN is not None
    args = [
        PODMAN,
        "build",
        "--isolation=chroot",
        "--network=host",
        "--layers=false",
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "-f",
        str(ROOT / "deploy" / "Dockerfile"),
        "-t",
        tag,
        str(ROOT),
    ]
    with log.open("wb") as sink:
        result = subprocess.run(
            args, stdout=sink, stderr=subprocess.STDOUT, timeout=600, check=False
        )
    assert result.returncode == 0, log.read_text(errors="replace")[-4000:]


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)


_names = itertools.count()


@dataclass
class Container:
    name: str
    port: int

    def inspect(self, template: str) -> str:
        return podman("container", "inspect", "--format", template, self.name).stdout.strip()

    @property
    def pid(self) -> int:
        """PID 1 of the container as the host sees it: gunicorn's arbiter."""
        return int(self.inspect("{{.State.Pid}}"))

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def running(self) -> bool:
        return self.inspect("{{.State.Status}}") == "running"


@contextlib.contextmanager
def container(
    image: str, options: Sequence[str] = (), command: Sequence[str] = ()
) -> Iterator[Container]:
    """A detached container of `image` listening on a port of its own ($PORT), until the block
    ends; removed then whatever happened."""
    port = free_port()
    name = f"vrypt-test-{os.getpid()}-{next(_names)}"
    podman(*RUN, "--detach", "--name", name, "--env", f"PORT={port}", *options, image, *command)
    box = Container(name, port)
    try:
        wait_listening(box)
        yield box
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def wait_listening(box: Container, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", box.port), timeout=1).close()
            return
        except OSError:
            pass
        if not box.running():
            raise AssertionError(f"container {box.name} exited:\n{box.logs()}")
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {box.port} after {timeout}s:\n{box.logs()}")


def host_processes(parent: int) -> list[int]:
    """The children of a host PID (the arbiter's workers), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry.name))
    return children


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def ids(pid: int) -> tuple[int, int]:
    """The real uid and gid of a host PID."""
    fields = status(pid)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def pid_inside(pid: int) -> int:
    """The PID that a host PID has in its container's PID namespace (the last of NSpid)."""
    return int(status(pid)["NSpid"].split()[-1])
